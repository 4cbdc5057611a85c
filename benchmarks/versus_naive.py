"""The CPU target's ratio, the naive eager port's step time over lopt_gen's torch step, with
the two alternating round by round in one process.

``step_bench.py`` times its contenders one after the other. On a small shared CPU either
can land in a slower stretch (benchmarks/RESULTS.md, "Two speeds in one process"): the naive
port of mulo at 4M took 1,087 ms in one run and 889 ms in another with the same code, which
moves the ratio by a fifth. Here each round times ``--steps`` steps of each (after one
untimed step), the order reversed every other round, and the ratio is taken round by round;
the figure is the median of the rounds' ratios.

    python benchmarks/versus_naive.py --step mulo@4M --rounds 6
    python benchmarks/versus_naive.py --step mulo@16M --rounds 3 --steps 1
    python benchmarks/versus_naive.py --step mulo@4M --rounds 6 --naive-onednn
    python benchmarks/versus_naive.py --step mulo@4M --rounds 6 --compile-elementwise

``--naive-onednn`` adds a third contender: the naive port with its three dense layers run
through oneDNN (``ops.onednn_linear``, bias and activation fused) instead of ``x @ W.T + b``
(MKL), which the torch step uses for its middle layer.  It shows how much of the ratio comes
from the choice of matrix-multiply library rather than from the step's schedule.
``--compile-elementwise`` adds the torch step with ``compile_elementwise=True`` (step_bench's
``lopt-torch-compiled``; its first, untimed step compiles) to the alternation, with its own
ratios.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

def naive_onednn_step(step):
    """``step`` (the naive port's) with ``tests.reference._mlp`` swapped, while it runs, for the
    same three layers through oneDNN."""
    from lopt_gen.runtime import ops
    from tests import reference

    relu, plain = ops.onednn_linear("relu"), ops.onednn_linear("none")
    if relu is None or plain is None:
        raise SystemExit("--naive-onednn: this torch build has no usable oneDNN fused linear layer")

    def mlp(weights, x):
        w = {k: v.to(reference.DTYPE).contiguous() for k, v in weights.items()}
        h = relu(x.contiguous(), w["mlp.0.weight"], w["mlp.0.bias"])
        h = relu(h, w["mlp.1.weight"], w["mlp.1.bias"])
        return plain(h, w["mlp.2.weight"], w["mlp.2.bias"])

    def run():
        saved, reference._mlp = reference._mlp, mlp
        try:
            step()
        finally:
            reference._mlp = saved

    return run


def run(args) -> dict:
    import step_bench
    from versus_revision import alternate

    if args.threads:
        torch.set_num_threads(args.threads)
    spec, _, size = args.step.partition("@")
    n = step_bench.parse_size(size or "4M")
    prob = step_bench.Problem(n, torch.device("cpu"))
    opts = argparse.Namespace(lr=None, nonfinite="skip", chunk_elems=None)
    ours = ["lopt-torch"] + (["lopt-torch-compiled"] if args.compile_elementwise else [])
    steps = {c: step_bench.make_step_fn(c, spec, prob, opts)[0] for c in ours + ["naive-eager"]}
    if args.naive_onednn:
        steps["naive-onednn"] = naive_onednn_step(step_bench.make_step_fn("naive-eager", spec, prob, opts)[0])
    for fn in steps.values():
        fn()
    rounds = alternate(steps, args.rounds, args.steps)
    print(f"# {spec} at {step_bench.size_label(n)} parameters ({len(prob.shapes)} tensors), "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    print("| | ms per round | median |")
    print("|---|---|---:|")
    for c, values in rounds.items():
        print(f"| {c} | {', '.join(f'{v:.0f}' for v in values)} | {statistics.median(values):.1f} |")
    row = {"spec": spec, "size": step_bench.size_label(n), "threads": torch.get_num_threads()}
    # (column prefix, torch step, naive contender)
    pairs = [(c.replace("lopt-torch", "").replace("-", "_"), c, naive)
             for naive in ["naive-eager"] + (["naive-onednn"] if args.naive_onednn else []) for c in ours]
    for prefix, c, naive in pairs:
        ratios = [b / a for a, b in zip(rounds[c], rounds[naive])]
        bold = "**" if (c, naive) == ("lopt-torch", "naive-eager") else ""
        print(f"| {naive} / {c} | {', '.join(f'{x:.2f}' for x in ratios)} | {bold}{statistics.median(ratios):.2f}x{bold} |")
        key = "ratio" + prefix + ("" if naive == "naive-eager" else "_onednn")
        row[key] = round(statistics.median(ratios), 3)
    for c in rounds:
        key = {"lopt-torch": "lopt_torch", "lopt-torch-compiled": "lopt_torch_compiled", "naive-eager": "naive",
               "naive-onednn": "naive_onednn"}[c]
        row[f"{key}_ms"] = round(statistics.median(rounds[c]), 2)
        row[f"rounds_{key}_ms"] = " ".join(f"{v:.2f}" for v in rounds[c])
    if args.out:
        step_bench.write_csv([row], Path(args.out) / f"versus_naive_{spec}_{row['size']}.csv", list(row))
    return row


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--step", default="mulo@4M", metavar="SPEC@SIZE", help="spec and parameter count (default mulo@4M)")
    ap.add_argument("--rounds", type=int, default=6, help="rounds (default 6)")
    ap.add_argument("--steps", type=int, default=2, help="timed steps of each contender per round (default 2)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--out", default=None, help="folder for a CSV of the rounds")
    ap.add_argument("--compile-elementwise", action="store_true",
                    help="also time the torch step with compile_elementwise=True")
    ap.add_argument("--naive-onednn", action="store_true",
                    help="also time the naive port with its dense layers through oneDNN")
    return run(ap.parse_args(argv))


if __name__ == "__main__":
    main()
