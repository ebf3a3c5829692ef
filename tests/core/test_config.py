"""Typed configs <-> YAML: what a user sees when a config file is right or wrong."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Literal, Optional, Tuple

import pytest

from core.config import (FieldProblem, apply_overrides, from_dict, load_yaml, save_yaml,
                         to_dict)
from core.errors import ConfigError
from core.preprocess import PreprocessConfig

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "resources" / "configs" / "preprocess.yaml"


@dataclass
class Inner:
    mode: Literal["fast", "slow"] = "fast"
    size: Optional[Tuple[float, float, float]] = field(default=None, metadata={"gt": 0})
    level: int = field(default=4, metadata={"min": 0, "max": 9})


@dataclass
class Outer:
    name: str = "x"
    ratio: float = 0.5
    flag: bool = False
    items: List[int] = field(default_factory=list)
    inner: Inner = field(default_factory=Inner)

    def validate(self):
        if self.name == "bad":
            raise FieldProblem("name", "'bad' is reserved.")


def write(tmp_path: Path, text: str, name: str = "my.yaml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def message(exc_info) -> str:
    return str(exc_info.value)


def test_yaml_builds_nested_dataclass_with_conversions(tmp_path):
    p = write(tmp_path, "name: a\nratio: 2\nitems: [1, 2]\ninner:\n  mode: slow\n"
                        "  size: [1, 0.5, 0.5]\n  level: 9\n")
    cfg = load_yaml(p, Outer)
    assert cfg == Outer(name="a", ratio=2.0, items=[1, 2],
                        inner=Inner(mode="slow", size=(1.0, 0.5, 0.5), level=9))
    assert isinstance(cfg.ratio, float) and isinstance(cfg.inner.size, tuple)
    assert load_yaml(write(tmp_path, "", "empty.yaml"), Outer) == Outer()


def test_misspelt_key_names_file_key_and_suggests_the_right_one(tmp_path):
    p = write(tmp_path, "inner:\n  mdoe: slow\n")
    with pytest.raises(ConfigError) as e:
        load_yaml(p, Outer)
    msg = message(e)
    assert str(p) in msg and "'inner.mdoe'" in msg and "Did you mean 'mode'" in msg
    p = write(tmp_path, "normalization:\n  mode: zscore\n", "pre.yaml")
    with pytest.raises(ConfigError) as e:
        load_yaml(p, PreprocessConfig)
    assert "'normalization'" in message(e) and "Did you mean 'normalisation'" in message(e)


@pytest.mark.parametrize("text, key, words", [
    ("inner:\n  mode: medium\n", "inner.mode", ["'medium'", "fast, slow"]),
    ("inner:\n  size: [1, -0.5, 1]\n", "inner.size", ["greater than 0"]),
    ("inner:\n  size: [1, 1]\n", "inner.size", ["exactly 3", "[z, y, x]"]),
    ("inner:\n  level: 12\n", "inner.level", ["12", "at most 9"]),
    ("inner:\n  level: 2.5\n", "inner.level", ["whole number"]),
    ("flag: 1\n", "flag", ["true or false"]),
    ("ratio: fast\n", "ratio", ["'fast'", "number"]),
    ("items: 3\n", "items", ["list"]),
    ("name: bad\n", "name", ["reserved"]),
])
def test_bad_values_name_file_key_value(tmp_path, text, key, words):
    p = write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        load_yaml(p, Outer)
    msg = message(e)
    assert msg.startswith(f"{p}: key '{key}'")
    for w in words:
        assert w in msg


def test_preprocess_bad_values(tmp_path):
    p = write(tmp_path, "normalisation:\n  mode: zscore2\n", "preprocess.yaml")
    with pytest.raises(ConfigError) as e:
        load_yaml(p, PreprocessConfig)
    assert message(e) == (f"{p}: key 'normalisation.mode': 'zscore2' is not one of "
                          "zscore, robust, percentile, none.")
    p = write(tmp_path, "resample:\n  factors: [-1, 1, 1]\n")
    with pytest.raises(ConfigError, match=r"resample\.factors.*greater than 0"):
        load_yaml(p, PreprocessConfig)
    p = write(tmp_path, "resample:\n  factors: [1, 1, 1]\n  target_voxel_size_um: [1, 1, 1]\n")
    with pytest.raises(ConfigError, match="not both"):
        load_yaml(p, PreprocessConfig)
    p = write(tmp_path, "normalisation:\n  low: 99\n  high: 2\n")
    with pytest.raises(ConfigError, match=r"normalisation\.low.*below high"):
        load_yaml(p, PreprocessConfig)
    p = write(tmp_path, "targets:\n  connectivity: true\n")
    with pytest.raises(ConfigError, match="not one of 1, 2, 3"):
        load_yaml(p, PreprocessConfig)


def test_yaml_syntax_error_and_missing_file(tmp_path):
    p = write(tmp_path, "inner:\n  mode: [fast\n")
    with pytest.raises(ConfigError, match=r"not valid YAML at line \d+"):
        load_yaml(p, Outer)
    with pytest.raises(ConfigError, match="not found"):
        load_yaml(tmp_path / "nope.yaml", Outer)
    with pytest.raises(ConfigError, match="mapping"):
        load_yaml(write(tmp_path, "- a\n- b\n"), Outer)


def test_section_of_a_larger_file(tmp_path):
    p = write(tmp_path, "preprocess:\n  inner:\n    level: 1\n")
    assert load_yaml(p, Outer, section="preprocess").inner.level == 1
    with pytest.raises(ConfigError, match="'train:'"):
        load_yaml(p, Outer, section="train")
    p = write(tmp_path, "preprocess:\n  inner:\n    levl: 1\n")
    with pytest.raises(ConfigError, match="'preprocess.inner.levl'"):
        load_yaml(p, Outer, section="preprocess")


def test_save_load_round_trip_is_atomic(tmp_path):
    cfg = Outer(name="b", items=[3], inner=Inner(mode="slow", size=(2.0, 1.0, 1.0)))
    out = save_yaml(tmp_path / "sub" / "saved.yaml", cfg, header="made by a test")
    assert out.read_text().startswith("# made by a test\n")
    assert load_yaml(out, Outer) == cfg
    assert sorted(p.name for p in out.parent.iterdir()) == ["saved.yaml"]  # no temp files
    assert to_dict(cfg)["inner"]["size"] == [2.0, 1.0, 1.0]


def test_overrides_are_checked_like_a_file():
    cfg = apply_overrides(Outer(), {"inner.size": "1,0.5,0.5", "ratio": None, "flag": True})
    assert cfg.inner.size == (1.0, 0.5, 0.5) and cfg.flag is True and cfg.ratio == 0.5
    with pytest.raises(ConfigError, match=r"command line: key 'inner.size'"):
        apply_overrides(Outer(), {"inner.size": "1,0,1"})
    with pytest.raises(ConfigError, match="unknown key 'inner.sise'"):
        apply_overrides(Outer(), {"inner.sise": "1,1,1"})
    assert from_dict(Outer, {"inner": None}) == Outer()


def test_example_preprocess_yaml_documents_every_key_with_defaults():
    cfg = load_yaml(EXAMPLE, PreprocessConfig)
    assert cfg == PreprocessConfig()
    text = EXAMPLE.read_text()
    for section, keys in to_dict(PreprocessConfig()).items():
        assert f"\n{section}:\n" in text
        for key in keys:
            assert f"\n  {key}:" in text, f"{section}.{key} missing from the example"
