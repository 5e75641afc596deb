"""Caption text: cleaning a BLIP caption into prompt text and reading a class name from it (pure text;
shared by the ``blip-caption`` estimator and the DreamBooth datamodule)."""
from __future__ import annotations

import re

_LEAD = re.compile(r"^(there is |this is |it is )?((a|an|the) )?((close[- ]up |black and white )?"
                   r"(photo|photograph|picture|image|painting|drawing|rendering|render) of )?((a|an|the) )?")
# the official Make-It-3D / Customize-It-3D main.py: drop "there is ", "close up" -> "photo",
# "black background" / "white background" -> "ground"
_REPLACE = ((re.compile(r"\bthere (is|are) "), ""), (re.compile(r"\bclose[- ]up\b"), "photo"),
            (re.compile(r"\b(black|white) background\b"), "ground"),
            # ours: BLIP-large's non-words ("arafed", "araffe", "arafly", ...) name nothing
            (re.compile(r"\baraf+\w*\s*"), ""))
_STOP = {"on", "in", "with", "at", "of", "near", "by", "next", "under", "over", "sitting", "standing", "lying",
         "is", "are", "and", "that", "which", "against", "from", "to", "for", "holding", "inside", "behind"}


def clean_caption(caption: str) -> str:
    """BLIP caption -> prompt text without BLIP's artefacts: "there is an arafed teddy bear on a white background"
    -> "a teddy bear on a ground" (the official code's replacements, plus BLIP-large's "araf..." non-words;
    an "an" left before a consonant becomes "a")."""
    text = " ".join(caption.split())
    for pattern, repl in _REPLACE:
        text = pattern.sub(repl, text)
    text = re.sub(r"\b([Aa])n (?=[b-df-hj-np-tv-z])", r"\1 ", text)
    return " ".join(text.split())


def class_from_caption(caption: str, max_words: int = 3) -> str:
    """The caption's head noun phrase: "a photo of a small teddy bear sitting on a table" -> "small teddy bear".

    Leading "a photo of" / articles are dropped, the phrase ends before the first preposition,
    verb-like "-ing" word or conjunction, and its last ``max_words`` words are kept (the head noun
    is last in English noun phrases). Empty when the caption has no words.
    """
    text = _LEAD.sub("", re.sub(r"[^a-z0-9' -]", " ", caption.lower()).strip())
    words = []
    for word in text.split():
        if word in _STOP or (word.endswith("ing") and len(word) > 4 and words):
            break
        words.append(word)
    return " ".join(words[-max_words:])
