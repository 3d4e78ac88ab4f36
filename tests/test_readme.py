"""The README's Python examples run as written (the layer example and the expert-parallel one)."""

import pathlib
import re

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_examples_run():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) >= 2
    namespace: dict = {}
    for block in blocks:  # later blocks reuse names from earlier ones (cfg, nnx, moe_jax)
        exec(compile(block, str(README), "exec"), namespace)
    assert namespace["y"].shape == namespace["x"].shape
    assert 0.0 <= float(namespace["aux"]["null_ratio"]) <= 1.0
    assert namespace["layer"].parallel is not None  # the expert-parallel example built its layer
