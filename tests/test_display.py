"""Notebook rendering of DepthModel / Program (depthjax/core/display.py): the HTML is parsed
back into its table and checked against what each transform is known to do to the program
(computed here by hand), not against the renderer's own helpers."""

from html.parser import HTMLParser

import jax
import numpy as np
import pytest
from flax import traverse_util

import depthjax as dj
from depthjax.core import display

VOID = {"br", "hr", "img", "col", "meta", "input"}


class Parsed(HTMLParser):
    """Table rows as cell texts, the style of every cell, all text, and a well-formedness
    check (every tag closed in order)."""

    def __init__(self, html: str):
        super().__init__()
        self.stack, self.rows, self.styles, self.text, self.titles = [], [], [], [], []
        self.columns = []  # the strip: titles of the step boxes in each column
        self._cell = None
        self.feed(html)
        self.close()
        assert not self.stack, f"unclosed tags {self.stack}"

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag not in VOID:
            self.stack.append(tag)
        if tag == "tr":
            self.rows.append([])
            self.styles.append([])
        if tag in ("td", "th"):
            self._cell = []
            self.styles[-1].append(attrs.get("style", ""))
        if "flex-direction:column" in attrs.get("style", ""):
            self.columns.append([])
        if "title" in attrs:
            self.titles.append(attrs["title"])
            self.columns[-1].append(attrs["title"])

    def handle_endtag(self, tag):
        assert self.stack and self.stack[-1] == tag, f"</{tag}> closes {self.stack[-1:]}"
        self.stack.pop()
        if tag in ("td", "th"):
            self.rows[-1].append("".join(self._cell).strip())
            self._cell = None

    def handle_data(self, data):
        self.text.append(data)
        if self._cell is not None:
            self._cell.append(data)

    @property
    def all_text(self) -> str:
        return " ".join(self.text)

    def table(self) -> list[dict[str, str]]:
        """Body rows as {column header: cell text}."""
        head, *body = self.rows
        return [dict(zip(head, r)) for r in body if len(r) == len(head)]

    def column_style(self, column: str) -> list[str]:
        i = self.rows[0].index(column)
        return [s[i] for r, s in zip(self.rows[1:], self.styles[1:]) if len(r) == len(self.rows[0])]


@pytest.fixture(scope="module")
def model6():
    return dj.init(dj.configs.get("llama-tiny", n_layers=6), jax.random.key(1))


def _ties_text(tied: list[int]) -> str:
    return f"steps {', '.join(map(str, tied))}" if tied else ""


def test_sequential_model(model6):
    p = Parsed(model6._repr_html_())
    rows = p.table()
    assert [r["step"] for r in rows] == [str(i) for i in range(6)]
    assert [r["block"] for r in rows] == [str(i) for i in range(6)]
    assert all(r["attn"] == "1" and r["mlp"] == "1" and r["tied with"] == "" for r in rows)
    assert "parallel" not in rows[0] and "per-step params" not in rows[0]
    assert "depth 6 · 6 distinct table rows" in p.all_text
    n = model6.n_params
    blocks = sum(x.size for x in jax.tree.leaves(model6.params["blocks"]))
    assert f"{n:,} parameters" in p.all_text and f"blocks {blocks:,}" in p.all_text
    assert "table of 6 blocks" in p.all_text and "d_model=64" in p.all_text
    # The strip: one box per step, in order, labelled by its block.
    assert p.titles == [f"step {i}: block {i}, attn 1, mlp 1" for i in range(6)]


def test_ties_share_a_colour(model6):
    tied = dj.depth.tie(model6, 2, strategy="cycle")
    rows = Parsed(tied._repr_html_()).table()
    assert [int(r["block"]) for r in rows] == [i % 2 for i in range(6)]
    for i, r in enumerate(rows):
        assert r["tied with"] == _ties_text([j for j in range(6) if j % 2 == i % 2 and j != i])
    styles = Parsed(tied._repr_html_()).column_style("block")
    assert styles[0] == styles[2] == styles[4] != styles[1] == styles[3] == styles[5]
    assert "background" in styles[0]
    # A partly tied program: only the shared row is coloured.
    p = Parsed(model6.with_program(dj.Program.create([0, 1, 1, 2]))._repr_html_())
    assert [("background" in s) for s in p.column_style("block")] == [False, True, True, False]
    assert [r["tied with"] for r in p.table()] == ["", "steps 2", "steps 1", ""]
    assert "table rows not run: 3, 4, 5" in p.all_text


def test_parallel_groups_and_gates(model6):
    m = dj.depth.parallelize(model6, [[2, 3, 4]], combine="mean")
    m = dj.depth.drop_sublayers(m, attn=[1], mlp=[5])
    p = Parsed(m._repr_html_())
    rows = p.table()
    assert [r["parallel"] for r in rows] == ["", "", "g2 ┐", "g2 │", "g2 ┘", ""]
    assert [r["attn"] for r in rows] == ["1", "off", "1", "1", "1", "1"]
    assert [r["mlp"] for r in rows] == ["1", "1", "1", "1", "1", "off"]
    # combine="mean" scales each member's update by 1/3.
    assert [r["per-step params"] for r in rows] == ["", ""] + ["update ×0.333"] * 3 + [""]
    assert "1 parallel group" in p.all_text and "1 attn gated off" in p.all_text
    assert "1 mlp gated off" in p.all_text
    # Strip: steps 2-4 are stacked in one column.
    assert [len(c) for c in p.columns] == [1, 1, 3, 1]
    assert p.columns[2] == [f"step {i}: block {i}, attn 1, mlp 1" for i in (2, 3, 4)]
    assert "step 1: block 1, attn 0, mlp 1" in p.titles


def test_relax_shows_lora_rank_per_step(model6):
    tied = dj.depth.tie(model6, 3, strategy="sequence")
    relaxed = dj.depth.relax(tied, model6, rank=3)
    rows = Parsed(relaxed._repr_html_()).table()
    # Reference: the rank each step needs is the rank of (its original kernel - the shared
    # row's kernel), capped at 3; the label shows the largest over kernels and their count.
    orig = traverse_util.flatten_dict(model6.params["blocks"])
    shared = traverse_util.flatten_dict(tied.params["blocks"])
    block = np.asarray(tied.program.block)
    for i, r in enumerate(rows):
        ranks = []
        for path, w in orig.items():
            if path[-1] != "kernel":
                continue
            n_in = 2 if path[-2] == "o" else 1
            diff = np.asarray(w[i] - shared[path][block[i]])
            diff = diff.reshape(int(np.prod(diff.shape[:n_in])), -1)
            ranks.append(min(3, np.linalg.matrix_rank(diff, tol=1e-6)))
        ranks = [k for k in ranks if k]
        want = f"LoRA r={max(ranks)} on {len(ranks)} kernels" if ranks else ""
        assert want in r["per-step params"], (i, r)
        assert bool(ranks) == ("LoRA" in r["per-step params"])


def test_untied_norm_deltas(model6):
    # Give every step its own norm weights, then tie: the shared rows keep the stepwise
    # source's norms and the other steps carry the difference as per-step deltas.
    blocks = dict(model6.params["blocks"])
    rng = np.random.default_rng(0)
    blocks["mlp_norm"] = {"scale": 1 + 0.1 * rng.standard_normal(blocks["mlp_norm"]["scale"].shape)}
    m = model6.replace(params={**model6.params, "blocks": blocks})
    tied = dj.depth.tie(m, 2, strategy="sequence", share_norms=False)
    rows = Parsed(tied._repr_html_()).table()
    scale = np.asarray(blocks["mlp_norm"]["scale"])  # [6, D]
    src = {0: 0, 1: 3}  # stepwise: steps 0 and 3
    for i, r in enumerate(rows):
        differs = not np.array_equal(scale[i], scale[src[i // 3]])
        assert r["per-step params"] == ("Δ mlp_norm" if differs else ""), (i, r)


def test_recovery_adapters(model6):
    tokens = np.random.default_rng(0).integers(0, 256, (4, 16)).astype(np.int32)
    pruned = dj.depth.drop(model6, [1, 4])
    rec = dj.recover(pruned, model6, tokens, method="linear", rank=2)
    p = Parsed(rec._repr_html_())
    rows = p.table()
    # Pruned steps run original steps 0, 2, 3, 5: a removed span ends right before the
    # pruned steps 1 and 3, whose inputs get the adapters.
    assert [r["block"] for r in rows] == ["0", "2", "3", "5"]
    assert [r["per-step params"] for r in rows] == [
        "",
        "adapter: bias + rank 2",
        "",
        "adapter: bias + rank 2",
    ]
    assert "table rows not run: 1, 4" in p.all_text
    assert "final adapter" not in p.all_text
    # Dropping the last step puts the adapter before the head.
    last = dj.recover(dj.depth.drop(model6, [5]), model6, tokens, method="bias")
    assert "final adapter before the head" in Parsed(last._repr_html_()).all_text


def test_batched_traced_and_abstract(model6):
    progs = jax.tree.map(
        lambda *a: np.stack(a), *[dj.Program.create([0, 1, 2]), dj.Program.create([2, 1, 0])]
    )
    p = Parsed(progs._repr_html_())
    assert "a batch of programs (2,); showing the first" in p.all_text
    assert [r["block"] for r in p.table()] == ["0", "1", "2"]

    seen = []
    jax.jit(lambda prog: seen.append(prog._repr_html_()) or prog.attn.sum())(model6.program)
    assert "no values: traced or abstract" in seen[0]
    abstract = jax.eval_shape(lambda m: m, model6)
    assert "no values" in abstract._repr_html_() and "table of 6 blocks" in abstract._repr_html_()


def test_long_program_is_elided():
    prog = dj.Program.create(np.arange(300) % 7)
    p = Parsed(prog._repr_html_())
    assert len(p.table()) == 256
    assert "… 44 steps not shown …" in p.all_text
    assert p.table()[-1]["step"] == "299" and p.table()[-1]["block"] == str(299 % 7)


def test_ipython_displays_html(model6):
    formatters = pytest.importorskip("IPython.core.formatters")
    data, _ = formatters.format_display_data(model6)
    assert "text/html" in data and "<table" in data["text/html"]
    assert data["text/plain"].startswith("DepthModel(llama")
    data, _ = formatters.format_display_data(model6.program)
    assert "<table" in data["text/html"]


def test_step_rows_match_program(model6):
    """The structured rows behind the HTML, checked on a looped + parallel program."""
    m = dj.depth.repeat(model6, [1, 2], times=2)  # steps 0,1,2,1,2,3,4,5
    m = dj.depth.parallelize(m, [[6, 7]])
    rows = display.step_rows(m.program)
    assert [r.block for r in rows] == [0, 1, 2, 1, 2, 3, 4, 5]
    assert [r.tied for r in rows] == [(), (3,), (4,), (1,), (2,), (), (), ()]
    assert [r.group for r in rows] == [0, 1, 2, 3, 4, 5, 6, 6]
    assert [r.group_size for r in rows] == [1] * 6 + [2, 2]


def test_step_rows_name_each_steps_attention_kind():
    """Gemma 3 rows alternate sliding-window and global attention (with their own RoPE
    bases); after a reorder each step lists the kind of the row it runs."""
    cfg = dj.configs.get("gemma3-tiny")
    model = dj.depth.reorder(dj.init(cfg, jax.random.key(0)), [2, 0, 3])
    rows = display.step_rows(model.program, model.params.get("steps"), cfg)
    kinds = [r.extras[0] for r in rows]
    for r, kind in zip(rows, kinds):
        local = cfg.layer_types[r.block] == "L"
        assert kind.startswith(f"window {cfg.sliding_window}" if local else "global"), kind
        theta = cfg.local_rope_theta if local else cfg.rope_theta
        assert kind.endswith(f"rope {theta:g}"), kind
    assert len(set(kinds)) == 2  # both kinds present
    html = display.model_html(model)
    assert kinds[0] in html
    # models whose rows all share one kind show no kind column
    plain = dj.init(dj.configs.get("llama-tiny"), jax.random.key(0))
    assert all(r.extras == () for r in display.step_rows(plain.program, None, plain.config))
