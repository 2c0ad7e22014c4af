"""Experiments behind ``steepest reproduce``: one module per note (and one beyond them).

Each module defines ``TITLE``, ``THREADS`` (the intra-op threads it runs with,
applied by the harness; None for the default) and ``run(ctx: steepest.report.Context)``,
which measures into plain data, writes tables, figures and results through ``ctx``
and records its verdicts with ``ctx.claim`` (see :func:`claim`). To add one, write
the module and register it here with one line (and its source in :data:`SOURCES`).

This module imports nothing, so the command line can name the notes without the
``reproduce`` extra installed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Source:
    """What an experiment tests: a note (title, address) or, with ``beyond=True``, a comparison beyond the notes."""

    short: str
    title: str
    url: str
    beyond: bool = False
    topic: str = ""  # what an experiment beyond the notes compares


REGISTRY: dict[str, str] = {
    "mclip": "steepest.experiments.mclip",
    "flatnce": "steepest.experiments.flatnce",
    "eg": "steepest.experiments.eg",
    "penalties": "steepest.experiments.penalties",
    "isotropy": "steepest.experiments.isotropy",
    "optim": "steepest.experiments.optim",
    "qkclip": "steepest.experiments.qkclip",
}

#: experiment -> the note it reproduces (Jianlin Su, kexue.fm; English titles, originals in Chinese)
SOURCES: dict[str, Source] = {
    "mclip": Source("mclip via msign", "Computing singular value clipping mclip via msign (part 1)",
                    "https://kexue.fm/archives/11006"),
    "flatnce": Source("FlatNCE", "FlatNCE: is floating-point error why small-batch contrastive learning does poorly?",
                      "https://kexue.fm/archives/8586"),
    "eg": Source("EG step sizes", "Exponentiated gradient descent + meta-learning = adaptive learning rates",
                 "https://kexue.fm/archives/8968"),
    "penalties": Source("gradient penalties", "An inequality between input-gradient and parameter-gradient penalties",
                        "https://kexue.fm/archives/8796"),
    "isotropy": Source("isotropy", "Why we prefer isotropy: an understanding via steepest descent",
                       "https://kexue.fm/archives/11549"),
    "optim": Source("Keller Jordan (2024)", "Muon: An optimizer for hidden layers in neural networks",
                    "https://kellerjordan.github.io/posts/muon/", beyond=True,
                    topic="SGD, SignSGD, Muon and NorMuon against AdamW on two tasks"),
    "qkclip": Source("Kimi K2 (2025)", "Kimi K2: Open Agentic Intelligence, MuonClip (with Su, QK-Clip: taking Muon "
                     "one step further on the way to scale-up, kexue.fm/archives/11126)",
                     "https://arxiv.org/abs/2507.20534", beyond=True,
                     topic="QK-Clip against runaway attention logits of a transformer trained with Muon"),
}


def full_command(name: str, jobs: bool = False) -> str:
    """The command that runs experiment ``name`` at full size."""
    return f"steepest reproduce --full --only {name}" + (" --jobs 2" if jobs else "")


def claim(ctx: Any, name: str, text: str, verdict: str, figure: str, *, split: str, seeds: list[int],
          command: str | None = None) -> None:
    """Record a verdict of experiment ``name`` on one claim of its source through ``ctx.claim``.

    Smoke mode's sizes only exercise the code: a claim about learning (``split`` other than "none") is then
    "not measured", whatever its numbers say. A claim read on the test split with fewer than
    :data:`~steepest.experiments._protocol.MIN_SEEDS` paired seeds shows a direction, not a verdict: it is "not
    measured" too. A claim left "not measured" without a ``command`` names the run that measures it (quick mode
    after smoke, full mode otherwise).
    """
    from ._protocol import MIN_SEEDS

    src = SOURCES[name]
    if ctx.mode == "smoke" and split != "none":
        verdict, command = "not measured", None
    elif split == "test" and len(seeds) < MIN_SEEDS and verdict != "not measured":
        verdict, command = "not measured", None
    if verdict == "not measured" and command is None:
        command = f"steepest reproduce --only {name}" if ctx.mode == "smoke" else full_command(name)
    ctx.claim(src.topic if src.beyond else src.title, src.url, text, verdict, figure, split=split, seeds=seeds,
              beyond=src.beyond, command=command)
