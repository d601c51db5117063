"""What the system says about itself: JSON logs and `xnai status`."""
