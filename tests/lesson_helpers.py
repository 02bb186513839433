"""What the lesson tests share: importing a lesson by path and checking the figures it wrote."""
import importlib.util
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def load_lesson(name):
    """Import lessons/<name>.py by path: its file name starts with a digit, so `import` cannot."""
    spec = importlib.util.spec_from_file_location(f"lesson_{name}", os.path.join(ROOT, "lessons", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def assert_figures(paths, out_dir, n):
    assert len(paths) == n
    for path in paths:
        assert os.path.dirname(path) == str(out_dir), f"{path} was not written to out_dir"
        with open(path, "rb") as f:
            assert f.read(8) == PNG_MAGIC, f"{path} is not a PNG file"
        assert os.path.getsize(path) > 10_000, f"{path} is suspiciously small: an empty figure?"
