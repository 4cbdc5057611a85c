"""generated/ is the committed output of compiling specs/: it must be current and reproducible."""

import os
import subprocess
import sys

from lopt_gen.compiler import GENERATED_DIR, render, stale_files
from lopt_gen.spec import load_spec, shipped_specs

from .conftest import ROOT


def test_generated_is_up_to_date():
    stale = []
    for name, path in shipped_specs().items():
        stale += stale_files(render(load_spec(path), path), GENERATED_DIR / name)
    assert not stale, f"generated/ is stale, run `lopt-gen compile`: {stale}"


def test_compile_check_cli_passes_and_detects_staleness(tmp_path):
    cmd = [sys.executable, "-m", "lopt_gen.cli", "compile"]
    ok = subprocess.run(cmd + ["--check"], cwd=ROOT, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    out = tmp_path / "g"
    subprocess.run(cmd + ["adam", "--out", str(out)], cwd=ROOT, check=True, capture_output=True)
    (out / "adam" / "torch_step.py").write_text("# edited by hand\n")
    bad = subprocess.run(cmd + ["adam", "--out", str(out), "--check"], cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode == 1
    assert "torch_step.py" in bad.stderr


def test_codegen_is_deterministic_across_processes(tmp_path):
    """Same specs, different hash seeds, byte-identical output."""
    outs = []
    for seed in ("1", "2"):
        d = tmp_path / seed
        env = dict(os.environ, PYTHONHASHSEED=seed)
        subprocess.run([sys.executable, "-m", "lopt_gen.cli", "compile", "--out", str(d)], cwd=ROOT, env=env,
                       check=True, capture_output=True)
        outs.append({p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()})
    assert outs[0] == outs[1]
    assert len(outs[0]) == 4 * len(shipped_specs())


def test_spec_file_name_cannot_inject_code(tmp_path):
    from lopt_gen.compiler import source_label

    evil = tmp_path / 'x"""\nimport os\n""".yaml'
    label = source_label(evil)
    assert '"' not in label and "\n" not in label
    spec = load_spec("adam")
    text = render(spec, evil)["torch_step.py"]
    compile(text, "torch_step.py", "exec")
    assert "import os" not in text


def test_meta_parameter_docs_reach_the_generated_info():
    """A learnable decay's meta-parameter keeps its documentation (and no init values: it is a
    constant init); the doc once landed in ``values`` one character at a time."""
    from lopt_gen.lower import lower

    prog = lower(load_spec("small_fc_lopt"))
    decl = prog.meta["decay.m"]
    assert decl.init == "const" and decl.values == ()
    assert decl.doc.startswith("learnable decay")
    info = render(load_spec("small_fc_lopt"))["torch_step.py"]
    assert "'doc': 'learnable decay" in info
