"""Task registry: hub ids, splits, text columns, templates and label words.

A template is a format string over the example's text columns plus ``{mask}``. The prompt placeholders are
not part of the template: the scorer inserts them right after the start token, so every task gets them in
the same place (as in BBT and the FedBPT reference). Causal LMs use ``TaskSpec.causal`` instead: a template
that ends where the label word would follow, label words that are single space-prefixed tokens, and the cue (the
template's end) that follows the prompt when it is placed after the input.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from fedbpt.errors import ConfigError, opt


@dataclass(frozen=True)
class CausalPrompt:
    """The task as a causal LM sees it: the template ends where the label word would follow (no ``{mask}``).

    Label words are given without their leading space; with label_encoding ``space`` (the causal default) the
    scorer reads the next-token logits of " word", which must be one token. Causal vocabularies often lack the
    masked words as single tokens (SmolLM2: " Athlete", " Album"), so the words may differ from ``label_words``.
    """

    template: str
    label_words: tuple[str, ...]
    cue: str | None = None

    def split(self) -> tuple[str, str]:
        """(text part, cue) of the template for the after-input placement, ``[start] {text part} P {cue}``.

        The cue is the end of the template that asks for the label (" It was", " Answer:"): it follows the prompt, so
        the text part before it, the same for every candidate, can be encoded once. None takes what follows the
        template's last text field.
        """
        cue = self.cue
        if cue is None:
            cue = self.template[self.template.rfind("}") + 1 :]
        if not cue or not self.template.endswith(cue) or "{" in cue:
            raise ConfigError(
                f"causal cue {cue!r} is not a non-empty end of the template {self.template!r} after its text fields"
            )
        return self.template[: len(self.template) - len(cue)], cue


@dataclass(frozen=True)
class TaskSpec:
    name: str
    hub_path: str
    hub_config: str | None
    test_split: str
    text_columns: tuple[str, ...]
    template: str
    label_words: tuple[str, ...]
    metric: str = "acc"
    drop_labels: tuple[int, ...] = field(default_factory=tuple)
    causal: CausalPrompt | None = None

    @property
    def num_classes(self) -> int:
        return len(self.label_words)


PLANTED = "planted"  # the synthetic task; research.planted builds its data and model

TASKS: dict[str, TaskSpec] = {
    "sst2": TaskSpec(
        "sst2",
        "nyu-mll/glue",
        "sst2",
        "validation",
        ("sentence",),
        ". {sentence} . It was {mask} .",
        ("bad", "great"),
        causal=CausalPrompt("{sentence} It was", ("bad", "great"), " It was"),
    ),
    "yelp_polarity": TaskSpec(
        "yelp_polarity",
        "fancyzhx/yelp_polarity",
        None,
        "test",
        ("text",),
        ". {text} . It was {mask} .",
        ("bad", "great"),
        causal=CausalPrompt("{text} It was", ("bad", "great"), " It was"),
    ),
    "ag_news": TaskSpec(
        "ag_news",
        "fancyzhx/ag_news",
        None,
        "test",
        ("text",),
        ". {mask} News: {text}",
        ("World", "Sports", "Business", "Tech"),
        causal=CausalPrompt("Article: {text}\nTopic:", ("World", "Sports", "Business", "Tech"), "\nTopic:"),
    ),
    "dbpedia": TaskSpec(
        "dbpedia",
        "fancyzhx/dbpedia_14",
        None,
        "test",
        ("content",),
        "[ Category: {mask} ] {content}",
        (
            "Company",
            "Education",
            "Artist",
            "Athlete",
            "Office",
            "Transportation",
            "Building",
            "Natural",
            "Village",
            "Animal",
            "Plant",
            "Album",
            "Film",
            "Written",
        ),
        causal=CausalPrompt(
            "Article: {content}\nCategory:",
            (
                "company",
                "school",
                "artist",
                "athlete",
                "politician",
                "transport",
                "building",
                "nature",
                "village",
                "animal",
                "plant",
                "album",
                "film",
                "book",
            ),
            "\nCategory:",
        ),
    ),
    "mrpc": TaskSpec(
        "mrpc",
        "nyu-mll/glue",
        "mrpc",
        "validation",
        ("sentence1", "sentence2"),
        ". {sentence1} ? {mask} , {sentence2}",
        ("No", "Yes"),
        metric="f1",
        causal=CausalPrompt(
            "{sentence1}\n{sentence2}\nQuestion: Do both sentences mean the same thing? Answer:",
            ("No", "Yes"),
            " Answer:",
        ),
    ),
    "rte": TaskSpec(
        "rte",
        "nyu-mll/glue",
        "rte",
        "validation",
        ("sentence1", "sentence2"),
        ". {sentence1} ? {mask} , {sentence2}",
        ("Yes", "No"),
        causal=CausalPrompt(
            '{sentence1}\nQuestion: Does this imply that "{sentence2}"? Answer:', ("Yes", "No"), " Answer:"
        ),
    ),
    "snli": TaskSpec(
        "snli",
        "stanfordnlp/snli",
        None,
        "test",
        ("premise", "hypothesis"),
        ". {premise} ? {mask} , {hypothesis}",
        ("Yes", "Maybe", "No"),
        drop_labels=(-1,),
        causal=CausalPrompt(
            '{premise}\nQuestion: Does this imply that "{hypothesis}"? Yes, no, or maybe? Answer:',
            ("Yes", "Maybe", "No"),
            " Answer:",
        ),
    ),
    # Synthetic optimisation check (planted.py): fixed-length windows, labels planted by a hidden prompt.
    PLANTED: TaskSpec(
        PLANTED,
        "synthetic",
        None,
        "test",
        ("sentence",),
        "{sentence} It was {mask} .",
        ("bad", "great"),
        causal=CausalPrompt("{sentence} It was", ("bad", "great")),
    ),
}


def get_task(name: str) -> TaskSpec:
    try:
        return TASKS[name]
    except KeyError:
        raise ConfigError(
            f"unknown task '{name}': use {opt('task_name')} with one of {', '.join(sorted(TASKS))}"
        ) from None
