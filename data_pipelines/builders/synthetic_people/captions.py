"""Caption templates for synthetic people: synonyms, verb forms, shuffled optional phrases.

Every caption names the top and the bottom (style + colour); hair is mentioned with probability 0.8,
shoes with 0.6, a bag (when there is one) with 0.9. Pure Python/NumPy.
"""

from __future__ import annotations

import numpy as np

from data_pipelines.builders.synthetic_people.draw import Attributes

_SUBJECTS = ("a person", "a pedestrian", "someone", "an individual", "a young person",
             "a person walking")
_VERBS = ("is wearing", "wears", "is dressed in", "has on", "is wearing")  # 5 forms, see _GERUNDS
_GERUNDS = ("wearing", "dressed in", "in", "clad in", "sporting")
_TOPS = {
    "tshirt": ("t-shirt", "tee", "short-sleeved shirt", "t shirt"),
    "jacket": ("jacket", "coat", "long-sleeved jacket", "zip-up jacket"),
    "dress": ("dress", "sleeveless dress", "long dress"),
}
_BOTTOMS = {
    "pants": ("pants", "trousers", "long pants", "slacks"),
    "shorts": ("shorts", "short pants", "pair of shorts"),
    "skirt": ("skirt", "short skirt", "skirt"),
}
_COLOUR_WORDS = {"grey": ("grey", "gray"), "purple": ("purple", "violet"), "blond": ("blond", "blonde")}
_PRONOUNS = ("the person", "this person", "they", "the pedestrian")


def _pick(rng: np.random.Generator, options):
    return options[int(rng.integers(len(options)))]


def _colour(rng: np.random.Generator, name: str) -> str:
    return _pick(rng, _COLOUR_WORDS.get(name, (name,)))


def _article(phrase: str) -> str:
    """'red dress' -> 'a red dress'; plural garments ('blue pants') take no article."""
    if phrase.endswith(("pants", "trousers", "slacks", "shorts")) and "pair of" not in phrase:
        return phrase
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _verb(who: str, singular: str, plural: str) -> str:
    return f"{who} {plural if who == 'they' else singular}"


def _hair_phrase(rng: np.random.Generator, a: Attributes) -> str:
    colour = _colour(rng, a.hair_colour)
    if a.hair_style == "short":
        return _pick(rng, (f"short {colour} hair", f"{colour} hair cut short", f"short {colour} hair"))
    return _pick(rng, (f"long {colour} hair", f"{colour} hair reaching past the shoulders",
                       f"long {colour} hair down the back"))


def _shoe_phrase(rng: np.random.Generator, a: Attributes) -> str:
    colour = _colour(rng, a.shoe_colour)
    return _pick(rng, (f"{colour} shoes", f"{colour} sneakers", f"a pair of {colour} shoes"))


def _bag_sentence(rng: np.random.Generator, a: Attributes, who: str) -> str:
    colour = _colour(rng, a.bag_colour)
    if a.bag_style == "backpack":
        return _pick(rng, (f"{_verb(who, 'carries', 'carry')} {_article(colour)} backpack",
                           f"{_verb(who, 'has', 'have')} {_article(colour)} backpack on the back",
                           f"{_article(colour)} backpack is on {'their' if who == 'they' else 'the'} back"))
    return _pick(rng, (f"{_verb(who, 'holds', 'hold')} {_article(colour)} handbag",
                       f"{_verb(who, 'carries', 'carry')} {_article(colour)} bag in one hand",
                       f"{_article(colour)} handbag hangs from one hand"))


def _sentence(text: str) -> str:
    text = text.strip()
    return text[0].upper() + text[1:] + "."


def make_caption(attrs: Attributes, rng: np.random.Generator) -> str:
    """Returns one caption (1-3 sentences) describing `attrs`; randomness comes from `rng`."""
    top = f"{_colour(rng, attrs.top_colour)} {_pick(rng, _TOPS[attrs.top_style])}"
    bottom = f"{_colour(rng, attrs.bottom_colour)} {_pick(rng, _BOTTOMS[attrs.bottom_style])}"
    clothes = (f"{_article(top)} and {_article(bottom)}" if rng.random() < 0.5
               else f"{_article(bottom)} and {_article(top)}")
    say_hair, say_shoes = rng.random() < 0.8, rng.random() < 0.6
    say_bag = attrs.bag_style != "none" and rng.random() < 0.9
    subject = _pick(rng, _SUBJECTS)
    extras: list[str] = []
    form = int(rng.integers(3))
    if form == 0:  # "A person with long hair is wearing X and Y."
        lead = subject + (f" with {_hair_phrase(rng, attrs)}" if say_hair else "")
        main = f"{lead} {_pick(rng, _VERBS)} {clothes}"
    elif form == 1:  # "A person wearing X and Y." (participle)
        main = f"{subject} {_pick(rng, _GERUNDS)} {clothes}"
        if say_hair:
            extras.append(f"{_verb(_pick(rng, _PRONOUNS), 'has', 'have')} {_hair_phrase(rng, attrs)}")
    else:  # "A person in X and Y." / "X and Y worn by a person."
        main = _pick(rng, (f"{subject} in {clothes}", f"{clothes} worn by {subject}"))
        if say_hair:
            extras.append(f"{_hair_phrase(rng, attrs)} frames the face")
    if say_shoes:
        who = _pick(rng, _PRONOUNS)
        extras.append(_pick(rng, (f"{_verb(who, 'wears', 'wear')} {_shoe_phrase(rng, attrs)}",
                                  f"on the feet are {_shoe_phrase(rng, attrs)}")))
    if say_bag:
        extras.append(_bag_sentence(rng, attrs, _pick(rng, _PRONOUNS)))
    order = rng.permutation(len(extras))
    sentences = [_sentence(main)] + [_sentence(extras[i]) for i in order]
    return " ".join(sentences)
