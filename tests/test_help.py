"""`python train_*.py --help`: the shipped configs with their purpose, the default config, where keys are documented."""

import sys

import pytest
from conftest import run_cmd

from recipe.config import CONFIG_DIR, shipped_configs


def test_every_shipped_config_opens_with_a_one_line_purpose():
    names = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml") if p.stem != "defaults")
    assert [name for name, _ in shipped_configs()] == names and "L0_sanity" in names
    for name, purpose in shipped_configs():
        assert purpose and purpose.endswith("."), (
            f"hydra_config/{name}.yaml: first line must be a comment: one sentence of purpose"
        )


@pytest.mark.parametrize(
    "script, default", [("train_fsdp2.py", "L0_sanity"), ("train_cp.py", "L0_sanity_cp"), ("train_mfsdp.py", "L0_sanity")]
)
def test_help_lists_configs_and_where_keys_are_documented(script, default):
    r = run_cmd([sys.executable, script, "--help"], timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"without --config-name this script runs {default}" in r.stdout
    assert "documented in recipe/config.py" in r.stdout
    for name, purpose in shipped_configs():
        assert f"  {name}" in r.stdout and purpose in r.stdout


def test_every_config_key_is_documented_where_it_is_defined():
    """Each field of the schema (recipe/config.py) carries a comment: on its line, or a comment block just above it
    (which may cover a run of fields with no blank line between them)."""
    import dataclasses
    import inspect
    import typing

    from recipe.config import TrainConfig

    def schemas(schema):
        yield schema
        for hint in typing.get_type_hints(schema).values():
            if dataclasses.is_dataclass(hint):
                yield from schemas(hint)

    undocumented = []
    for schema in set(schemas(TrainConfig)):
        covered = False
        fields = {f.name for f in dataclasses.fields(schema)}
        sections = {name for name, hint in typing.get_type_hints(schema).items() if dataclasses.is_dataclass(hint)}
        for line in inspect.getsource(schema).splitlines():
            text = line.strip()
            name = text.split(":")[0]
            if not text or text.startswith(("@", "class ", '"""')):
                covered = False
            elif text.startswith("#"):
                covered = True
            elif name in fields and name not in sections:  # a section is documented by its own dataclass
                if "#" not in text and not covered:
                    undocumented.append(f"{schema.__name__}.{name}")
                covered = covered and "#" not in text
    assert not undocumented, f"recipe/config.py: fields without a comment: {undocumented}"
