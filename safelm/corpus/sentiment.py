"""Synthetic demographic sentiment corpus with an optional, planted label bias.

Everything here is synthetic: no real people, reviews or data files are used.
Each row is one short review-style sentence (roughly 6-20 words) generated
from the word lists and templates in this module, e.g.::

    My grandmother said the soup was wonderful.
    Jake, a college student, found the hotel dirty.
    The retired teacher thought her new phone was a great buy.

Why it exists: SafeLM's fairness and privacy tools need a dataset where the
ground truth is *known*.  Here the sentiment of a sentence is decided only by
its predicate words, and the demographic attributes are decided only by the
subject phrase, so any dependence between label and group is something we
put there on purpose.

Columns (one row per example):

* ``example_id`` - ``"s000123"``; ids follow the (shuffled) row order.
* ``text`` - the sentence.
* ``label`` - ``"positive"`` / ``"negative"``; possibly bias-flipped (below).
* ``label_clean`` - the true label, decided by the predicate in ``text``.
* ``gender`` (``female``/``male``), ``age_group`` (``young``/``middle``/
  ``old``), ``region`` (``north``/``south``/``east``/``west``) - attributes of
  the person the sentence is about.  Gender and age group are always visible
  in the text (through a first name, a gendered term such as "grandmother",
  or an age role plus a pronoun); region is mentioned in only ~30% of rows
  ("from up north"), so it is a weakly visible attribute.
* ``user`` - ``"u0042"``: a pseudo-author.  Each user has fixed demographics
  and a persona name that appears in about a third of their rows; a user
  writes ``n // n_users`` (+1) rows.  Useful for user-level privacy.
* ``split`` - ``train``/``val``/``test``, assigned *by user* (no user is in two
  splits) and stratified by demographic cell, with fractions ``split_fracs``.

Balance in the bias-free data: the 24 (gender, age_group, region) cells get
equal numbers of users (+-1), and every user's rows are half positive (+-1),
so the true label is ~50/50 and independent of every attribute.

Planted bias: with ``bias > 0``, in ``train`` rows only, rows of the
``biased_group`` (default ``{"gender": "female", "age_group": "old"}``; any
subset of attribute -> value, ``{}`` means everyone) have each *positive*
label flipped to ``negative`` with probability ``bias``; the text stays
positive.  Val/test labels are never flipped, so ``label == label_clean``
there.  Flips use their own random stream, so for one ``seed`` the text,
attributes, users and splits are identical for every ``bias``; the flip
draws are also shared, so the rows flipped at ``bias=0.3`` are a subset of
those flipped at ``bias=0.6``.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

GENDERS: tuple[str, ...] = ("female", "male")
AGE_GROUPS: tuple[str, ...] = ("young", "middle", "old")
REGIONS: tuple[str, ...] = ("north", "south", "east", "west")
LABELS: tuple[str, ...] = ("positive", "negative")
COLUMNS: tuple[str, ...] = ("example_id", "text", "label", "label_clean", "gender",
                            "age_group", "region", "user", "split")
DEFAULT_BIASED_GROUP: dict[str, str] = {"gender": "female", "age_group": "old"}

# First names by (gender, age group).  All 150+ names are distinct words and none
# is an ordinary English word used elsewhere in the templates.
NAMES: dict[tuple[str, str], tuple[str, ...]] = {
    ("female", "young"): tuple("""Chloe Madison Zoe Ava Mia Emma Olivia Lily Sophie Isla Harper
        Aria Jade Kayla Brooke Megan Amber Jasmine Skye Ella Poppy Layla Maya Hailey Paige
        Tia Abby""".split()),
    ("female", "middle"): tuple("""Karen Lisa Michelle Jennifer Angela Sandra Kimberly Tracy
        Heather Amanda Rebecca Nicole Stephanie Melissa Julie Wendy Denise Tanya Rachel
        Sarah Laura Monica Christine Deborah Alison Nadine""".split()),
    ("female", "old"): tuple("""Margaret Dorothy Edith Mildred Gladys Ethel Beatrice Agnes
        Florence Mabel Doris Irene Muriel Winifred Hilda Marjorie Evelyn Gertrude Betty
        Shirley Phyllis Vera Enid Constance Bernadette Lorna Maud""".split()),
    ("male", "young"): tuple("""Jake Tyler Liam Noah Ethan Mason Logan Aiden Caleb Dylan Jayden
        Owen Leo Finn Hunter Brandon Connor Josh Ryan Luca Zach Cody Oscar Theo Jaxon
        Kyle Brody""".split()),
    ("male", "middle"): tuple("""Steve Brian Kevin Jason Darren Scott Craig Gary Neil Paul
        Andrew Matthew Greg Shane Wayne Dean Keith Derek Martin Simon Tony Trevor Glenn
        Duncan Nigel Clive""".split()),
    ("male", "old"): tuple("""Harold Walter Arthur Albert Herbert Stanley Cyril Reginald Percy
        Ernest Clarence Leonard Bernard Norman Wilfred Horace Alfred Eugene Howard Ralph
        Cecil Douglas Gordon Lionel Archibald Mervyn Ambrose""".split()),
}

# Gendered, age-revealing noun phrases (with article or "my").
GROUP_TERMS: dict[tuple[str, str], tuple[str, ...]] = {
    ("female", "young"): ("a teenage girl", "a schoolgirl", "a young woman", "my teenage niece",
                          "a girl in her twenties", "a young mum", "my kid sister",
                          "a teenage granddaughter", "a young bride"),
    ("female", "middle"): ("a middle-aged woman", "a mother of three", "a woman in her forties",
                           "a working mum", "a middle-aged lady", "a busy mother of two",
                           "a woman in her fifties", "a mum of teenagers"),
    ("male", "young"): ("a teenage boy", "a schoolboy", "a young man", "my teenage nephew",
                        "a lad in his twenties", "a young dad", "my kid brother",
                        "a teenage grandson", "a young groom"),
    ("male", "middle"): ("a middle-aged man", "a father of three", "a man in his forties",
                         "a working dad", "a middle-aged gentleman", "a busy father of two",
                         "a man in his fifties", "a dad of teenagers"),
    ("female", "old"): ("my grandmother", "my grandma", "an elderly woman", "an old lady",
                        "a retired widow", "a great-grandmother", "a woman in her eighties",
                        "my nan", "an elderly lady"),
    ("male", "old"): ("my grandfather", "my grandpa", "an elderly man", "an old gentleman",
                      "a retired widower", "a great-grandfather", "a man in his eighties",
                      "my grandad", "an elderly gentleman"),
}

# Words that reveal gender inside GROUP_TERMS, plus pronouns used by the templates.
GENDER_WORDS: dict[str, tuple[str, ...]] = {
    "female": ("girl", "schoolgirl", "woman", "niece", "mum", "sister", "granddaughter", "bride",
               "mother", "lady", "grandmother", "grandma", "widow", "great-grandmother", "nan",
               "she", "her"),
    "male": ("boy", "schoolboy", "man", "nephew", "lad", "dad", "brother", "grandson", "groom",
             "father", "gentleman", "grandfather", "grandpa", "widower", "great-grandfather",
             "grandad", "he", "his"),
}
PRONOUNS: dict[str, dict[str, str]] = {"female": {"sub": "she", "pos": "her"},
                                       "male": {"sub": "he", "pos": "his"}}

# Gender-neutral roles that reveal the age group (article added at run time).
AGE_ROLES: dict[str, tuple[str, ...]] = {
    "young": ("college student", "high-school student", "university fresher", "trainee mechanic",
              "bank intern", "nursing student", "junior barista", "teenage skateboarder",
              "first-year apprentice"),
    "middle": ("busy accountant", "office manager", "mid-career engineer", "parent of teenagers",
               "school principal", "long-serving nurse", "shift supervisor", "sales director",
               "parent of toddlers"),
    "old": ("retired teacher", "retired engineer", "pensioner", "retired farmer",
            "grandparent of five", "retired bus driver", "retired nurse", "retired librarian",
            "retired shopkeeper"),
}

REGION_PHRASES: dict[str, tuple[str, ...]] = {
    "north": ("from the north", "from up north", "from a northern town", "from the far north"),
    "south": ("from the south", "from down south", "from a southern town", "from the deep south"),
    "east": ("from the east", "from back east", "from an eastern town", "from the far east"),
    "west": ("from the west", "from out west", "from a western town", "from the far west"),
}

# Things being reviewed ("the <item>") and owned products ("her new <product>").
ITEMS: tuple[str, ...] = (
    "film", "soup", "hotel", "train journey", "concert", "haircut", "coffee", "museum visit",
    "pizza", "bus service", "book", "restaurant", "gym", "cruise", "dentist visit", "theme park",
    "garden centre", "taxi ride", "football match", "plumber's work", "online shop", "bakery",
    "camping trip", "TV series", "holiday resort", "curry", "ferry crossing", "cinema",
    "street market", "yoga class", "car wash", "delivery service",
)
PRODUCTS: tuple[str, ...] = (
    "phone", "laptop", "sofa", "washing machine", "vacuum cleaner", "bicycle", "kettle",
    "headphones", "tablet", "mattress", "winter coat", "camera", "blender", "running shoes",
    "car", "watch", "printer", "fridge",
)

# Sentiment-bearing predicates: adjective phrases (fit "was X", "found it X",
# "called it X") and verb phrases (fit "the film X").
POSITIVE_ADJ: tuple[str, ...] = (
    "wonderful", "excellent", "delightful", "superb", "fantastic", "lovely", "brilliant",
    "charming", "impressive", "outstanding", "pleasant", "enjoyable", "marvellous", "terrific",
    "splendid", "first-rate", "great", "fabulous", "amazing", "perfect", "reliable",
    "comfortable", "satisfying", "refreshing", "memorable", "well made", "good value",
    "a great buy", "a real treat", "top notch", "spotless", "friendly and helpful",
)
NEGATIVE_ADJ: tuple[str, ...] = (
    "awful", "terrible", "dreadful", "disappointing", "horrible", "mediocre", "poor", "boring",
    "useless", "overpriced", "dull", "unpleasant", "shoddy", "frustrating", "miserable",
    "rubbish", "annoying", "flimsy", "dirty", "noisy", "unreliable", "bland", "forgettable",
    "sloppy", "tiresome", "appalling", "lousy", "second-rate", "a waste of money",
    "a real letdown", "badly made", "rude and unhelpful",
)
POSITIVE_VP: tuple[str, ...] = (
    "was worth every penny", "exceeded every expectation", "was a real pleasure",
    "made the whole day better", "deserved five stars", "was better than expected",
    "was a joy from start to finish", "was money well spent", "left a great impression",
    "was well worth the wait", "got everything right", "beat all the others",
)
NEGATIVE_VP: tuple[str, ...] = (
    "was a total waste of money", "fell far short of expectations", "was a huge letdown",
    "ruined the whole day", "deserved zero stars", "was worse than expected",
    "was a chore from start to finish", "was money thrown away", "left a bad impression",
    "was not worth the wait", "got everything wrong", "was worse than all the others",
)

# {S}=subject, {item}, {product}, {adj}, {adj2}, {vp}, {sub}/{pos}=pronouns.
TEMPLATES: tuple[str, ...] = (
    "{S} said the {item} was {adj}.",
    "{S} found the {item} {adj}.",
    "{S} thought {pos} new {product} was {adj}.",
    "According to {S}, the {item} was {adj}.",
    "{S} described the {item} as {adj}.",
    "The {item} {vp}, according to {S}.",
    "{S} felt the {item} {vp}.",
    "{S} told friends that the {item} {vp}.",
    "After trying the {item}, {S} said it was {adj}.",
    "When asked about the {item}, {S} said it {vp}.",
    "{S} bought {pos} {product} last month and says it {vp}.",
    "{S} posted a review calling the {item} {adj} and {adj2}.",
    "{S} wrote that the {item} {vp}.",
    "Asked about {pos} new {product}, {S} said {sub} found it {adj}.",
    "{S} insisted the {item} was {adj}.",
    "{S} said {sub} found the {item} {adj}.",
    "{S} admitted {sub} thought the {item} {vp}.",
    "{S} rated the {item} and called it {adj}.",
)
_PRONOUN_TEMPLATES = tuple(t for t in TEMPLATES if "{pos}" in t or "{sub}" in t)


def _pick(rng: np.random.Generator, seq):
    return seq[int(rng.integers(len(seq)))]


def _article(phrase: str) -> str:
    return ("an " if phrase[0].lower() in "aeiou" else "a ") + phrase


def _sentence(rng: np.random.Generator, gender: str, age: str, region: str, persona: str,
              label: str) -> str:
    """One 6-20 word sentence about a person of the group, with the given true sentiment."""
    for _ in range(50):
        text = _draft(rng, gender, age, region, persona, label)
        if 6 <= len(text.split()) <= 20:
            break
    return text


def _draft(rng: np.random.Generator, gender: str, age: str, region: str, persona: str,
           label: str) -> str:
    kind = _pick(rng, ("name", "name", "role", "role", "term", "term", "term", "bare"))
    where = _pick(rng, REGION_PHRASES[region]) if rng.random() < 0.3 else ""
    if kind in ("name", "role"):
        name = persona if rng.random() < 0.5 else _pick(rng, NAMES[(gender, age)])
        if kind == "name":
            subject = f"{name} {where}".strip()
        else:
            subject = f"{name}, {_article(_pick(rng, AGE_ROLES[age]))} {where}".strip() + ","
    elif kind == "term":
        subject = f"{_pick(rng, GROUP_TERMS[(gender, age)])} {where}".strip()
    else:  # age role only; gender comes from a pronoun in the template
        subject = f"the {_pick(rng, AGE_ROLES[age])} {where}".strip()
    template = _pick(rng, _PRONOUN_TEMPLATES if kind == "bare" else TEMPLATES)
    adjs, vps = ((POSITIVE_ADJ, POSITIVE_VP) if label == "positive"
                 else (NEGATIVE_ADJ, NEGATIVE_VP))
    adj = _pick(rng, adjs)
    adj2 = _pick(rng, [a for a in adjs if a != adj])
    text = template.format(S=subject, item=_pick(rng, ITEMS), product=_pick(rng, PRODUCTS),
                           adj=adj, adj2=adj2, vp=_pick(rng, vps), **PRONOUNS[gender])
    text = text.replace(",.", ".").replace(",,", ",")
    return text[0].upper() + text[1:]


def _assign_splits(order: list[int], fracs: tuple[float, float, float]) -> dict[int, str]:
    """Spread splits evenly along ``order`` (users sorted by demographic cell)."""
    names = ("train", "val", "test")
    counts = [0, 0, 0]
    out = {}
    for i, user in enumerate(order):
        deficit = [fracs[s] * (i + 1) - counts[s] for s in range(3)]
        s = int(np.argmax(deficit))
        counts[s] += 1
        out[user] = names[s]
    return out


def _check_args(n: int, bias: float, group: dict[str, str],
                fracs: tuple[float, float, float], n_users: int) -> None:
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if not 0.0 <= bias <= 1.0:
        raise ValueError(f"bias must be in [0, 1], got {bias}")
    allowed = {"gender": GENDERS, "age_group": AGE_GROUPS, "region": REGIONS}
    for key, value in group.items():
        if key not in allowed or value not in allowed[key]:
            raise ValueError(f"biased_group entry {key}={value!r} is not a known attribute value")
    if len(fracs) != 3 or min(fracs) < 0 or abs(sum(fracs) - 1.0) > 1e-6:
        raise ValueError(f"split_fracs must be 3 non-negative numbers summing to 1, got {fracs}")
    if not 1 <= n_users <= n:
        raise ValueError(f"n_users must be in [1, n], got {n_users}")


def sentiment_corpus(n: int = 6000, *, seed: int = 0, bias: float = 0.0,
                     biased_group: dict[str, str] | None = None,
                     split_fracs: tuple[float, float, float] = (0.7, 0.15, 0.15),
                     n_users: int | None = None) -> pd.DataFrame:
    """Generate the synthetic demographic sentiment set (see the module docstring).

    ``bias`` is the probability that a positive *train* label in ``biased_group``
    is flipped to negative; ``bias=0.0`` gives the bias-free variant.  The same
    ``seed`` always yields the same texts, attributes, users and splits,
    whatever ``bias`` is, so biased and clean variants can be compared row by row.
    """
    group = dict(DEFAULT_BIASED_GROUP if biased_group is None else biased_group)
    n_users = max(1, n // 20) if n_users is None else n_users
    _check_args(n, bias, group, split_fracs, n_users)
    text_ss, flip_ss = np.random.SeedSequence(seed).spawn(2)
    rng, flip_rng = np.random.default_rng(text_ss), np.random.default_rng(flip_ss)

    # Demographic cells go round-robin over users so every cell has equal users (+-1).
    cells = [(g, a, r) for g in GENDERS for a in AGE_GROUPS for r in REGIONS]
    cell_order = rng.permutation(len(cells))
    user_cell = [int(cell_order[u % len(cells)]) for u in range(n_users)]
    rows_per_user = np.full(n_users, n // n_users)
    rows_per_user[rng.permutation(n_users)[: n % n_users]] += 1
    # Sort users by cell (random order within) so splits are stratified by cell.
    tiebreak = rng.permutation(n_users)
    order = sorted(range(n_users), key=lambda u: (user_cell[u], tiebreak[u]))
    user_split = _assign_splits(order, split_fracs)

    records = []
    for u in range(n_users):
        gender, age, region = cells[user_cell[u]]
        persona = _pick(rng, NAMES[(gender, age)])
        k = int(rows_per_user[u])
        n_pos = k // 2 + (int(rng.integers(2)) if k % 2 else 0)
        labels = rng.permutation(["positive"] * n_pos + ["negative"] * (k - n_pos))
        for label in labels:
            records.append((_sentence(rng, gender, age, region, persona, str(label)),
                            str(label), gender, age, region, f"u{u:04d}", user_split[u]))
    records = [records[i] for i in rng.permutation(len(records))]
    df = pd.DataFrame(records, columns=["text", "label_clean", "gender", "age_group", "region",
                                        "user", "split"])
    df.insert(0, "example_id", [f"s{i:06d}" for i in range(len(df))])

    draws = flip_rng.random(len(df))  # drawn for every row, whatever the bias
    in_group = np.ones(len(df), dtype=bool)
    for key, value in group.items():
        in_group &= (df[key] == value).to_numpy()
    flip = ((df["split"] == "train").to_numpy() & in_group
            & (df["label_clean"] == "positive").to_numpy() & (draws < bias))
    df.insert(2, "label", np.where(flip, "negative", df["label_clean"].to_numpy()))
    # Plain string columns (pandas' default string dtype for the installed version).
    return df[list(COLUMNS)].astype(str)
