"""Human-readable summaries of a compiled spec (``lopt-gen show``)."""

from __future__ import annotations

from .compiler import compile_program
from .passes import plan


def stage_table(prog, param_bytes: int = 4) -> list[dict]:
    """Per stage: the reductions that end it, the states it reads/writes, bytes per parameter.

    ``bytes_per_param`` counts the parameters, gradients and states a pass reads and writes.
    ``scratch_bytes_per_param`` counts, in addition, what the Triton kernels spend on row and
    column means of per-element values: each writes its argument to an fp32 scratch buffer
    that is read back and summed before the next pass (4 bytes written, 4 read)."""
    state_bytes = 2 if prog.state_dtype == "bfloat16" else 4
    leaves = {n.name: n for n in prog.nodes if type(n).__name__ == "Leaf"}
    rows = []
    stages = plan(prog)
    final = len(stages) - 1
    for st in stages:
        reads_elem = [leaves[v] for v in st.elem_inputs if v in leaves and leaves[v].level == "elem"]
        read_states = sorted({lf.source for lf in reads_elem if lf.kind == "state"})
        read_inputs = sorted({lf.name for lf in reads_elem if lf.kind == "input"})
        nbytes = 0
        for lf in reads_elem:
            nbytes += state_bytes if lf.kind == "state" else param_bytes
        written = []
        if st.index == final:
            nbytes += param_bytes  # the parameter (or its lookahead point)
            for n in prog.nodes:
                if type(n).__name__ == "StateWrite" and n.level == "elem":
                    written.append(n.state)
                    nbytes += state_bytes * len(n.values)
        reds = {}
        scratch = 0
        for r in st.reductions:
            reds[r.over] = reds.get(r.over, 0) + 1
            if r.over in ("row", "col") and r.arg_level == "elem":
                scratch += 8
        rows.append(dict(stage=st.index, reductions=reds, reads=read_inputs + read_states,
                         writes=(["p"] + written) if st.index == final else [], bytes_per_param=nbytes,
                         scratch_bytes_per_param=scratch, elem_nodes=len(st.elem_nodes)))
    return rows


def show_text(spec) -> str:
    prog = compile_program(spec)
    out = [f"spec {spec.name}  (hash {spec.spec_hash()[:12]})"]
    if spec.description:
        out.append(f"  {spec.description}")
    out.append("")
    if prog.features:
        out.append("features (network inputs):")
        out.append(f"  {'name':<22} {'count':>5}  {'normalised':<10} {'varies per':<10}")
        total = 0
        for name, width, norm, level in prog.features:
            total += width
            out.append(f"  {name:<22} {width:>5}  {'yes' if norm else 'no':<10} {level:<10}")
        out.append(f"  {'total':<22} {total:>5}")
        out.append("")
    if prog.network:
        net = prog.network
        line = f"network: {net['kind']} {net['inputs']} -> " + " -> ".join(map(str, net["hidden"]))
        line += " -> heads " + ", ".join(f"{k}[{w}]" for k, w in net["outputs"].items())
        if net.get("matmul_precision", "ieee") != "ieee":
            line += f" (Triton products of width >= 16 in {net['matmul_precision']})"
        out.append(line)
        if net.get("hierarchy"):
            h = net["hierarchy"]
            out.append(f"  per-tensor {h['tensor']['cell']} {h['tensor']['hidden']}"
                       + (f", global {h['global']['cell']} {h['global']['hidden']}" if h.get("global") else ""))
    else:
        out.append("network: none (hand-designed update rule)")
    out.append(f"meta-parameters: {prog.meta_count:,}")
    for name, m in sorted(prog.meta.items()):
        n = 1
        for s in m.shape:
            n *= s
        out.append(f"  {name:<28} {str(list(m.shape)):<12} {n:>7,}")
    out.append("")
    out.append("state per parameter tensor:")
    for key, d in prog.states.items():
        out.append(f"  {key:<16} {d.level:<7} width {d.width}" + (f"  ({d.doc})" if d.doc else ""))
    out.append("")
    rows = stage_table(prog)
    out.append(f"stage plan: {len(rows)} pass(es) over the parameters")
    for r in rows:
        reds = ", ".join(f"{k} x{v}" for k, v in r["reductions"].items()) or "none (final pass)"
        out.append(f"  pass {r['stage']}: reads {', '.join(r['reads']) or '-'}"
                   + (f"; writes {', '.join(r['writes'])}" if r["writes"] else "")
                   + f"; {r['bytes_per_param']} bytes/param"
                   + (f" (+{r['scratch_bytes_per_param']} row/column scratch)" if r["scratch_bytes_per_param"] else "")
                   + f"; ends with reductions: {reds}")
    total = sum(r["bytes_per_param"] for r in rows)
    scratch = sum(r["scratch_bytes_per_param"] for r in rows)
    out.append(f"  total: {total} bytes moved per parameter per step (fp32 parameters)"
               + (f", plus {scratch} of row/column scratch in the Triton kernels" if scratch else ""))
    return "\n".join(out)
