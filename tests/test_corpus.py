"""Oracle tests for the bundled synthetic corpora (safelm.corpus)."""

from __future__ import annotations

import os
import re
from collections import Counter

import numpy as np
import pandas as pd
import pytest

from safelm.corpus import sentiment_corpus, story_corpus, write_sentiment_csv, write_story_text
from safelm.corpus import sentiment as S
from safelm.corpus import stories as ST

COLS = ["example_id", "text", "label", "label_clean", "gender", "age_group", "region", "user",
        "split"]


@pytest.fixture(scope="module")
def clean() -> pd.DataFrame:
    return sentiment_corpus(seed=0)


@pytest.fixture(scope="module")
def biased() -> pd.DataFrame:
    return sentiment_corpus(seed=0, bias=0.6)


@pytest.fixture(scope="module")
def stories() -> list[str]:
    return story_corpus()


def _tokens(text: str) -> list[str]:
    return re.findall(r"[a-z]+(?:[-'][a-z]+)*", text.lower())


# ----------------------------------------------------------------- sentiment


def test_columns_and_value_sets(clean: pd.DataFrame) -> None:
    assert list(clean.columns) == COLS
    assert len(clean) == 6000
    assert set(clean["label"]) == {"positive", "negative"}
    assert set(clean["gender"]) == {"female", "male"}
    assert set(clean["age_group"]) == {"young", "middle", "old"}
    assert set(clean["region"]) == {"north", "south", "east", "west"}
    assert set(clean["split"]) == {"train", "val", "test"}
    assert clean["example_id"].is_unique
    assert clean["example_id"].str.fullmatch(r"s\d{6}").all()
    assert clean["user"].str.fullmatch(r"u\d{4}").all()
    assert clean["user"].nunique() == 6000 // 20
    assert clean["user"].value_counts().min() >= 2
    for col in COLS:
        assert all(isinstance(v, str) for v in clean[col])


def test_deterministic_and_seed_dependent(clean: pd.DataFrame) -> None:
    pd.testing.assert_frame_equal(clean, sentiment_corpus(seed=0))
    other = sentiment_corpus(seed=1)
    assert not clean["text"].equals(other["text"])


def test_user_level_splits(clean: pd.DataFrame) -> None:
    assert (clean.groupby("user")["split"].nunique() == 1).all()
    fracs = clean["split"].value_counts(normalize=True)
    for split, want in zip(("train", "val", "test"), (0.7, 0.15, 0.15)):
        assert abs(fracs[split] - want) < 0.03
    # users have fixed demographics
    assert (clean.groupby("user")[["gender", "age_group", "region"]].nunique() == 1).all().all()
    custom = sentiment_corpus(2000, seed=3, split_fracs=(0.5, 0.25, 0.25), n_users=80)
    assert custom["user"].nunique() == 80
    assert abs((custom["split"] == "train").mean() - 0.5) < 0.05


def test_label_and_attribute_balance(clean: pd.DataFrame) -> None:
    assert abs((clean["label"] == "positive").mean() - 0.5) < 0.02
    for col, k in (("gender", 2), ("age_group", 3), ("region", 4)):
        shares = clean[col].value_counts(normalize=True)
        assert (abs(shares - 1 / k) < 0.03).all(), (col, shares)
        for split in ("train", "val", "test"):
            sub = clean.loc[clean["split"] == split, col].value_counts(normalize=True)
            assert (abs(sub - 1 / k) < 0.06).all(), (col, split, sub)


def test_bias_free_label_independent_of_group(clean: pd.DataFrame) -> None:
    assert (clean["label"] == clean["label_clean"]).all()
    train = clean[clean["split"] == "train"]
    overall = (train["label"] == "positive").mean()
    for keys in (["gender", "age_group"], ["region"], ["gender", "age_group", "region"]):
        rates = train.groupby(keys)["label"].apply(lambda s: (s == "positive").mean())
        tol = 0.05 if len(keys) < 3 else 0.1
        assert (abs(rates - overall) < tol).all(), rates


def test_planted_bias(clean: pd.DataFrame, biased: pd.DataFrame) -> None:
    in_group = (biased["gender"] == "female") & (biased["age_group"] == "old")
    train = biased["split"] == "train"

    def pos_rate(df: pd.DataFrame, mask: pd.Series, col: str = "label") -> float:
        return float((df.loc[mask, col] == "positive").mean())

    target = pos_rate(biased, in_group & train)
    clean_rate = pos_rate(biased, in_group & train, "label_clean")
    assert abs(target - 0.4 * clean_rate) < 0.05
    for mask in (~in_group & train, in_group & ~train, ~in_group & ~train):
        assert pos_rate(biased, mask) == pos_rate(clean, mask)
    untouched = ~(in_group & train)
    assert (biased.loc[untouched, "label"] == biased.loc[untouched, "label_clean"]).all()
    # flips only ever turn positive into negative
    flipped = biased["label"] != biased["label_clean"]
    assert (biased.loc[flipped, "label_clean"] == "positive").all()
    assert flipped.sum() > 0


def test_biased_and_clean_identical_except_label(clean: pd.DataFrame,
                                                  biased: pd.DataFrame) -> None:
    rest = [c for c in COLS if c != "label"]
    pd.testing.assert_frame_equal(clean[rest], biased[rest])
    assert not clean["label"].equals(biased["label"])
    # shared flip draws: smaller bias flips a subset of the rows
    small = sentiment_corpus(seed=0, bias=0.3)
    f_small = small["label"] != small["label_clean"]
    f_big = biased["label"] != biased["label_clean"]
    assert (f_big[f_small]).all() and f_small.sum() < f_big.sum()


def test_custom_biased_group_and_validation() -> None:
    df = sentiment_corpus(1200, seed=5, bias=1.0, biased_group={"region": "north"})
    hit = (df["region"] == "north") & (df["split"] == "train")
    assert (df.loc[hit, "label"] == "negative").all()
    assert (df.loc[~hit, "label"] == df.loc[~hit, "label_clean"]).all()
    everyone = sentiment_corpus(600, seed=5, bias=1.0, biased_group={})
    assert (everyone.loc[everyone["split"] == "train", "label"] == "negative").all()
    for bad in (dict(bias=1.5), dict(biased_group={"gender": "other"}),
                dict(biased_group={"height": "tall"}), dict(split_fracs=(0.5, 0.2, 0.2)),
                dict(n_users=0)):
        with pytest.raises(ValueError):
            sentiment_corpus(200, **bad)
    tiny = sentiment_corpus(7, seed=1)
    assert len(tiny) == 7 and tiny["user"].nunique() == 1


def test_list_sizes() -> None:
    for names in S.NAMES.values():
        assert len(names) >= 25
    all_names = [n for names in S.NAMES.values() for n in names]
    assert len(all_names) == len(set(all_names))
    assert len(S.POSITIVE_ADJ) >= 30 and len(S.NEGATIVE_ADJ) >= 30
    assert len(S.ITEMS) + len(S.PRODUCTS) >= 20 and len(S.ITEMS) >= 20
    assert len(S.TEMPLATES) >= 12
    assert not set(S.POSITIVE_ADJ) & set(S.NEGATIVE_ADJ)


def test_text_length_and_sentiment_words(clean: pd.DataFrame) -> None:
    lengths = clean["text"].str.split().str.len()
    assert lengths.between(6, 20).all()
    assert 9 <= lengths.mean() <= 16
    assert clean["text"].nunique() > 0.9 * len(clean)
    # sentiment is carried by the predicate: a lexicon lookup recovers label_clean
    pos = set(S.POSITIVE_ADJ) | set(S.POSITIVE_VP)
    neg = set(S.NEGATIVE_ADJ) | set(S.NEGATIVE_VP)

    def lexicon(text: str) -> str:
        p = sum(phrase in text for phrase in pos)
        n = sum(phrase in text for phrase in neg)
        return "positive" if p > n else "negative"

    sample = clean.sample(1000, random_state=0)
    acc = (sample["text"].map(lexicon) == sample["label_clean"]).mean()
    assert acc > 0.97


def test_keyword_classifier_recovers_gender_and_age(clean: pd.DataFrame) -> None:
    gender_words = {g: {w.lower() for w in S.GENDER_WORDS[g]}
                    | {n.lower() for (gg, _), names in S.NAMES.items() if gg == g for n in names}
                    for g in S.GENDERS}

    def guess_gender(text: str) -> str:
        toks = _tokens(text)
        score = {g: sum(t in gender_words[g] for t in toks) for g in S.GENDERS}
        return max(score, key=score.get)

    age_names = {a: {n.lower() for (_, aa), names in S.NAMES.items() if aa == a for n in names}
                 for a in S.AGE_GROUPS}
    age_phrases = {a: [p.lower() for (_, aa), terms in S.GROUP_TERMS.items() if aa == a
                       for p in terms] + list(S.AGE_ROLES[a]) for a in S.AGE_GROUPS}

    def guess_age(text: str) -> str:
        low, toks = text.lower(), set(_tokens(text))
        score = {a: len(toks & age_names[a]) + sum(p in low for p in age_phrases[a])
                 for a in S.AGE_GROUPS}
        return max(score, key=score.get)

    assert (clean["text"].map(guess_gender) == clean["gender"]).mean() > 0.95
    assert (clean["text"].map(guess_age) == clean["age_group"]).mean() > 0.95


def test_region_weakly_visible(clean: pd.DataFrame) -> None:
    phrases = {r: S.REGION_PHRASES[r] for r in S.REGIONS}

    def mentioned(text: str) -> str | None:
        for r, ps in phrases.items():
            if any(p in text for p in ps):
                return r
        return None

    found = clean["text"].map(mentioned)
    share = found.notna().mean()
    assert 0.15 < share < 0.5
    assert (found[found.notna()] == clean.loc[found.notna(), "region"]).all()


def test_write_sentiment_csv(tmp_path) -> None:
    path = tmp_path / "sub" / "sent.csv"
    write_sentiment_csv(path, n=300, seed=2, bias=0.5)
    back = pd.read_csv(path, dtype=str, keep_default_na=False)
    pd.testing.assert_frame_equal(back, sentiment_corpus(300, seed=2, bias=0.5))
    assert os.listdir(path.parent) == ["sent.csv"]


# ------------------------------------------------------------------- stories


def test_story_count_size_and_determinism(stories: list[str]) -> None:
    assert len(stories) == 1500
    size_kb = len("\n\n".join(stories).encode()) / 1024
    assert 400 <= size_kb <= 700
    assert stories == story_corpus(seed=0)
    assert stories != story_corpus(seed=1)
    assert story_corpus(10, seed=0) == stories[:10]
    assert story_corpus(0) == []


def test_story_variety(stories: list[str]) -> None:
    sentences = Counter(s for st in stories for s in re.split(r"(?<=[.!?])\s+", st))
    assert len(sentences) > 2000
    assert len(set(stories)) == len(stories)
    # no single sentence dominates the text
    assert sentences.most_common(1)[0][1] < 0.1 * len(stories)
    assert len(ST.all_templates()) >= 150
    words = {w for values in ST.WORDS.values() for v in values for w in _tokens(v)}
    assert len(words) >= 300


def test_story_shape(stories: list[str]) -> None:
    for st in stories:
        assert "\n" not in st and "{" not in st and "}" not in st
        assert st.count('"') % 2 == 0
        n = len(re.findall(r'[.!?]"?(?=\s+[A-Z"]|$)', st))
        assert 3 <= n <= 10, st
        assert st[0].isupper() or st[0] == '"'
    assert sum('"' in st for st in stories) > 0.35 * len(stories)


def test_every_template_fills() -> None:
    rng = np.random.default_rng(0)
    for _ in range(5):
        ctx = ST._context(rng)
        for template in ST.all_templates():
            ST._fill(template, ctx)  # raises KeyError on an unknown slot


def test_write_story_text(tmp_path) -> None:
    path = tmp_path / "stories.txt"
    write_story_text(path, n_stories=40, seed=3)
    text = path.read_text(encoding="utf-8")
    assert text.rstrip("\n").split("\n\n") == story_corpus(40, seed=3)
    assert os.listdir(tmp_path) == ["stories.txt"]
