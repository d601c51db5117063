"""ggml's CPU backends in a portable llama.cpp build: the best variant for this CPU, loaded once per process."""

from __future__ import annotations

from pathlib import Path


class _BackendState:
    """Whether this process has loaded its CPU backend yet (the library's registry is per process)."""

    def __init__(self) -> None:
        self.loaded = False


_state = _BackendState()


def ggml_backend_libraries() -> list[Path]:
    """The CPU backend variants of a portable llama.cpp build (``libggml-cpu-*.so``), if it is one."""
    try:
        import llama_cpp
    except ImportError:
        return []
    lib = Path(str(llama_cpp.__file__)).parent / "lib"
    return sorted(lib.glob("libggml-cpu-*.so"))


def _loaded_ggml(lib: Path) -> str:
    """The ggml library file llama-cpp-python's libllama already loaded.

    A wheel holds no symlinks, so ``libggml.so`` and ``libggml.so.0`` are two copies of one library: opening
    the other one would make a second backend registry that llama.cpp never looks at.
    """
    import llama_cpp  # noqa: F401  loads libllama and, through it, libggml

    with open("/proc/self/maps", encoding="utf-8") as maps:
        mapped = {line.split()[-1] for line in maps if "/libggml.so" in line}
    found = sorted(path for path in mapped if Path(path).parent == lib)
    return found[0] if found else str(lib / "libggml.so")


def load_ggml_backends() -> None:
    """A portable build (``GGML_BACKEND_DL``) has no backend linked in: load the best CPU variant once.

    ggml scores every ``libggml-cpu-*.so`` against this CPU's features and loads the best one; a
    native build has its backend built in and needs nothing.
    """
    if _state.loaded:
        return
    variants = ggml_backend_libraries()
    if variants:
        import ctypes

        ggml = ctypes.CDLL(_loaded_ggml(variants[0].parent))
        if int(ggml.ggml_backend_reg_count()) == 0:
            ggml.ggml_backend_load_all_from_path.argtypes = [ctypes.c_char_p]
            ggml.ggml_backend_load_all_from_path(str(variants[0].parent).encode())
    _state.loaded = True
