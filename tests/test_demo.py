"""`make demo` end to end on a tiny budget."""

import re

import pytest

from lopt_gen import demo
from lopt_gen.weights import shipped_pretrained


@pytest.mark.filterwarnings("ignore")
def test_demo_quick_runs_every_shipped_optimizer(tmp_path, capsys):
    assert demo.main(["--quick", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    # every shipped spec compiled into the output folder
    assert (tmp_path / "generated" / "adam" / "torch_step.py").exists()
    # the adam spec tracks torch.optim.Adam step for step
    gap = float(re.search(r"adam spec vs torch.optim.Adam: ([0-9.e+-]+)", out).group(1))
    assert gap < 1e-5
    for name in shipped_pretrained():
        assert f"{name} (meta-trained)" in out
    plot = tmp_path / "digits_loss.png"
    assert plot.stat().st_size > 0
