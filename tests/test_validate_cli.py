"""`lopt-gen validate`: exit 0 when every spec is valid, else 2 with one line per problem.

Every problem line is ``FILE: field.path: reason`` (``<spec>`` for the spec as a whole),
the lines are exactly the problems ``load_spec`` reports, and no traceback ever shows.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lopt_gen.spec import SpecError, load_spec, shipped_specs

from .conftest import ROOT

LINE = re.compile(r"^(?P<file>.+?): (?P<path><spec>|[A-Za-z_][\w.\[\]-]*): (?P<reason>\S.*)$")


def validate(*args: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lopt_gen.cli", "validate", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def expected_lines(arg: str | Path) -> list[str]:
    """What validate must print for ``arg``: its problems from load_spec, one line each."""
    local = ROOT / arg if not Path(arg).is_absolute() and (ROOT / arg).is_file() else arg
    try:
        spec = load_spec(str(local))
    except SpecError as exc:
        return [f"{exc.source or arg}: {path or '<spec>'}: {reason}" for path, reason in exc.problems]
    return [f"{arg}: ok ({spec.name})"]


def no_traceback(proc: subprocess.CompletedProcess) -> None:
    assert "Traceback" not in proc.stdout and "Traceback" not in proc.stderr, proc.stdout + proc.stderr


def write(tmp_path: Path, name: str, text: str | bytes) -> Path:
    p = tmp_path / name
    if isinstance(text, bytes):
        p.write_bytes(text)
    else:
        p.write_text(text)
    return p


def problem_lines(proc) -> list[str]:
    return [line for line in proc.stdout.splitlines() if not re.search(r": ok \(\w+\)$", line)]


# ------------------------------------------------------------------------------ valid


def test_every_shipped_spec_file_is_valid():
    files = [p.relative_to(ROOT).as_posix() for p in shipped_specs().values()]
    assert len(files) == 8
    proc = validate(*files)
    no_traceback(proc)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert lines == [line for f in files for line in expected_lines(f)]
    assert all(line.endswith(f"ok ({Path(f).stem})") for f, line in zip(files, lines))


def test_every_shipped_spec_name_is_valid():
    names = list(shipped_specs())
    proc = validate(*names)
    no_traceback(proc)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.splitlines() == [f"{n}: ok ({n})" for n in names]


# ------------------------------------------------------------------------------ invalid


def test_broken_yaml(tmp_path):
    f = write(tmp_path, "broken.yaml", "name: x\nupdate: [g\nhyper: {a: 1\n")
    proc = validate(f)
    no_traceback(proc)
    assert proc.returncode == 2
    lines = proc.stdout.splitlines()
    assert len(lines) == 1
    m = LINE.match(lines[0])
    assert m and m["file"] == str(f) and m["path"] == "<spec>" and "not valid YAML" in m["reason"]
    assert "line " in m["reason"]
    assert lines == expected_lines(f)


def test_unknown_key(tmp_path):
    f = write(tmp_path, "unknown.yaml", "name: x\nupdate: g\naccumulators:\n  - {name: m, ema: g, decay: 0.9, "
                                        "decays: 0.5}\nbogus: 1\n")
    proc = validate(f)
    no_traceback(proc)
    assert proc.returncode == 2
    lines = proc.stdout.splitlines()
    assert lines == expected_lines(f)
    paths = [LINE.match(line)["path"] for line in lines]
    assert sorted(paths) == ["accumulators[0].decays", "bogus"]
    assert all("unknown key" in LINE.match(line)["reason"] for line in lines)


def test_missing_file(tmp_path):
    f = tmp_path / "nope.yaml"
    proc = validate(f)
    no_traceback(proc)
    assert proc.returncode == 2
    assert proc.stdout.splitlines() == [f"{f}: <spec>: cannot read the file: No such file or directory"]


def test_nonexistent_shipped_name():
    proc = validate("no_such_spec")
    no_traceback(proc)
    assert proc.returncode == 2
    lines = proc.stdout.splitlines()
    assert len(lines) == 1
    m = LINE.match(lines[0])
    assert m and m["file"] == "no_such_spec" and m["path"] == "<spec>"
    assert "no shipped spec" in m["reason"] and "adam" in m["reason"]


def test_mix_of_valid_and_invalid(tmp_path):
    good = write(tmp_path, "good.yaml", yaml.safe_dump({"name": "good", "update": "m",
                                                        "accumulators": [{"name": "m", "ema": "g", "decay": 0.9}]}))
    many = write(tmp_path, "many.yaml", yaml.safe_dump({
        "name": "1x", "update": "g.real", "hyper": {"lr": 1.0},
        "accumulators": [{"name": "m", "ema": "g", "decay": 1.5}],
        "network": {"kind": "mlp", "hidden": [0], "outputs": {"o": 1}, "hierarchy": {"tensor": {"hidden": 2}}},
    }))
    semantic = write(tmp_path, "semantic.yaml", yaml.safe_dump({"name": "sem", "let": {"a": "b", "b": "a"},
                                                                "update": "a + nope"}))
    not_mapping = write(tmp_path, "list.yaml", "- name: x\n- update: g\n")
    empty = write(tmp_path, "empty.yaml", "")
    features = write(tmp_path, "features.yaml", "name: f\nupdate: g\nfeatures: [{name: a, expr: g}]\n")
    broken = write(tmp_path, "broken.yaml", "name: x\n  update: g\n")
    args = ["adam", good, many, "specs/rmsprop.yaml", semantic, not_mapping, tmp_path / "missing.yaml", empty,
            features, "no_such_spec", broken, tmp_path, "hrnn"]
    proc = validate(*args)
    no_traceback(proc)
    assert proc.returncode == 2
    want = [line for a in args for line in expected_lines(a)]
    assert proc.stdout.splitlines() == want
    bad = problem_lines(proc)
    assert len(bad) >= 12
    for line in bad:
        m = LINE.match(line)
        assert m, f"not FILE: field.path: reason: {line!r}"
    by_file: dict[str, set] = {}
    for line in bad:
        m = LINE.match(line)
        by_file.setdefault(m["file"], set()).add(m["path"])
    assert {"name", "update", "hyper", "accumulators[0].decay", "network.hidden[0]"} <= by_file[str(many)]
    assert by_file[str(semantic)] and by_file[str(semantic)] <= {"let.a", "let.b", "update"}
    assert by_file[str(not_mapping)] == {"<spec>"}
    assert by_file[str(empty)] == {"<spec>"}
    assert by_file[str(features)] == {"<spec>"}
    assert by_file[str(tmp_path)] == {"<spec>"}
    assert by_file[str(broken)] == {"<spec>"}
    assert [line for line in proc.stdout.splitlines() if line.endswith(")") and ": ok (" in line] == [
        "adam: ok (adam)", f"{good}: ok (good)", "specs/rmsprop.yaml: ok (rmsprop)", "hrnn: ok (hrnn)"]


def test_one_line_per_problem_even_for_multiline_input(tmp_path):
    f = write(tmp_path, "nl.yaml", yaml.safe_dump({"name": "x", "update": "g\nimport os",
                                                   "let": {"a\nb": "g"}, "description": 5}))
    proc = validate(f)
    no_traceback(proc)
    assert proc.returncode == 2
    with pytest.raises(SpecError) as info:
        load_spec(f)
    assert len(proc.stdout.splitlines()) == len(info.value.problems)
    for line in proc.stdout.splitlines():
        assert LINE.match(line), line


# ------------------------------------------------------------------------------ known bugs


def test_bug_non_utf8_file(tmp_path):
    f = write(tmp_path, "latin1.yaml", b"name: x\nupdate: \"g \xff\xfe\"\n")
    proc = validate(f)
    no_traceback(proc)
    assert proc.returncode == 2


def test_bug_deeply_nested_yaml(tmp_path):
    f = write(tmp_path, "deep.yaml", "name: x\nupdate: g\nhyper: " + "[" * 5000 + "]" * 5000 + "\n")
    proc = validate(f)
    no_traceback(proc)
    assert proc.returncode == 2


def test_bug_huge_integer(tmp_path):
    f = write(tmp_path, "bigint.yaml", "name: x\nupdate: 1" + "0" * 400 + "\n")
    proc = validate(f)
    no_traceback(proc)
    assert proc.returncode == 2


def test_bug_duplicate_yaml_keys(tmp_path):
    f = write(tmp_path, "dup.yaml", "name: x\nupdate: g\nupdate: p\n")
    proc = validate(f)
    assert proc.returncode == 2
