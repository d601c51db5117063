"""Running the system: the embedded Redis and its memory guard, the supervisor (`xnai up`), Flower."""
