"""Write bild_kernels/data/wordnet_topics.txt: everyday topics for distillation prompts, from WordNet 3.0's nouns.

The templated training prompts (bild_kernels/distill/prompts.py) talk about ~400 hand-written topics; the
shipped feature draft agrees 0.66 with the large model on training prompts' continuations and 0.59 on
held-out ones, missing word pieces of topics it never saw. WordNet's noun index is an offline list of tens of
thousands of them. This keeps the ones an everyday chat might name:

- the lemma's first (most frequent) sense is a thing, creature, plant, food, substance, place, event, act,
  process, field of knowledge or kind of text (lexicographer files noun.artifact ... noun.communication);
- one to three words, each at most two tokens of the large model's tokenizer (rare and Latin names split
  into more), not a taxon ("genus_...", "...aceae");
- it occurs at least `--min-gloss-count` times in WordNet's own definitions (a frequency list of ~1.5 M
  words of plain English, all parts of speech);
- a noun first (never an adverb or an adjective, at most twice as many verb senses as noun ones), three
  letters or more, not an abbreviation;
- neither it nor any of its senses' glosses is offensive, vulgar, slang, violent or the like (a pattern);
- it is not a held-out topic of `bild_kernels.distill.prompts.EVAL_TOPICS` (nor one of a held-out phrase's
  rarer nouns: "reef" of "coral reefs"), a synonym of one (any sense), a direct hyponym's lemma, nor a
  phrase that contains one of those: the held-out set stays unseen.

Creatures and artifacts are written in the plural ("lighthouses"), the rest bare ("photosynthesis"),
proper names with their capitals ("Grand Canyon"; "the Kansas River", "the siege of Orleans"). Usage
(wordnet-base is Debian's package of WordNet 3.0):

    apt-get download wordnet-base && dpkg-deb -x wordnet-base_*.deb /tmp/wn
    python python/tools/wordnet_topics.py --wordnet /tmp/wn/usr/share/wordnet
"""
from __future__ import annotations

import argparse
import collections
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

LEXNAMES = {3: "Tops", 4: "act", 5: "animal", 6: "artifact", 7: "attribute", 8: "body", 9: "cognition",
            10: "communication", 11: "event", 12: "feeling", 13: "food", 14: "group", 15: "location",
            16: "motive", 17: "object", 18: "person", 19: "phenomenon", 20: "plant", 21: "possession",
            22: "process", 23: "quantity", 24: "relation", 25: "shape", 26: "state", 27: "substance", 28: "time"}
KEEP = ("act", "animal", "artifact", "cognition", "communication", "event", "food", "location", "object",
        "phenomenon", "plant", "process", "substance")
PLURAL = ("animal", "artifact")
BLOCK = re.compile(r"offensive|slur|vulgar|obscen|derogat|disparag|slang|sexual|genital|penis|vagin|excrement|"
                   r"feces|faeces|urin|racis|ethnic|insult|contempt|prostitut|nazi|tortur|murder|rape|suicid|"
                   r"pornograph|narcotic|execution|genocid|massacr|terroris|slave|traffick|abuse|abortion", re.I)
TAXON = re.compile(r"^(genus|family|order|class|phylum|division|subfamily|suborder|subclass|superfamily)_|"
                   r"(aceae|idae|ales|inae|phyta|mycetes|opsida)$")
LEMMA = re.compile(r"[a-z]+(-[a-z]+)?(_[a-z]+(-[a-z]+)?){0,2}")
HEADER = """\
# Everyday topics for distillation prompts, one per line (phrase<TAB>WordNet lexicographer file), most frequent first.
# Made by python/tools/wordnet_topics.py from WordNet 3.0's noun index (its docstring says how they are chosen).
# None of them is, names, or is a synonym of a held-out topic (bild_kernels.distill.prompts.EVAL_TOPICS).
#
# WordNet 3.0 Copyright 2006 by Princeton University. All rights reserved.
# Permission to use, copy, modify and distribute this software and database and its documentation for any
# purpose and without fee or royalty is hereby granted, provided that you agree to comply with the following
# copyright notice and statements, including the disclaimer, and that the same appear on ALL copies of the
# software, database and documentation, including modifications that you make for internal use or for
# distribution.
# THIS SOFTWARE AND DATABASE IS PROVIDED "AS IS" AND PRINCETON UNIVERSITY MAKES NO REPRESENTATIONS OR WARRANTIES,
# EXPRESS OR IMPLIED. BY WAY OF EXAMPLE, BUT NOT LIMITATION, PRINCETON UNIVERSITY MAKES NO REPRESENTATIONS OR
# WARRANTIES OF MERCHANTABILITY OR FITNESS FOR ANY PARTICULAR PURPOSE OR THAT THE USE OF THE LICENSED SOFTWARE,
# DATABASE OR DOCUMENTATION WILL NOT INFRINGE ANY THIRD PARTY PATENTS, COPYRIGHTS, TRADEMARKS OR OTHER RIGHTS.
# The name of Princeton University or Princeton may not be used in advertising or publicity pertaining to
# distribution of the software and/or database. Title to copyright in this software, database and any
# associated documentation shall at all times remain with Princeton University and LICENSEE agrees to preserve
# same.
"""


def read_synsets(wordnet: Path) -> dict:
    """offset -> (lexname, [words as written], gloss, [hyponym offsets])."""
    out = {}
    for line in open(wordnet / "data.noun", encoding="latin-1"):
        if line.startswith("  "):
            continue
        head, _, gloss = line.partition("| ")
        f = head.split()
        n_words = int(f[3], 16)
        words = [f[4 + 2 * i] for i in range(n_words)]
        p = 4 + 2 * n_words
        n_ptr = int(f[p])
        hypo = [f[p + 1 + 4 * i + 1] for i in range(n_ptr) if f[p + 1 + 4 * i] in ("~", "~i")]
        out[f[0]] = (LEXNAMES[int(f[1])], words, gloss.strip(), hypo)
    return out


def read_index(wordnet: Path, pos: str = "noun") -> dict:
    """lemma -> its synset offsets in `pos`, most frequent sense first."""
    out = {}
    for line in open(wordnet / f"index.{pos}", encoding="latin-1"):
        if line.startswith("  "):
            continue
        f = line.split()
        n_ptr = int(f[3])
        out[f[0]] = f[6 + n_ptr:]
    return out


def gloss_counts(wordnet: Path):
    """Word, bigram and trigram counts over every definition in WordNet (all parts of speech)."""
    words = []
    for pos in ("noun", "verb", "adj", "adv"):
        for line in open(wordnet / f"data.{pos}", encoding="latin-1"):
            if not line.startswith("  "):
                words += re.findall(r"[a-z]+(?:-[a-z]+)?", line.partition("| ")[2].lower())
    grams = collections.Counter(words)
    grams.update(zip(words, words[1:]))
    grams.update(zip(words, words[1:], words[2:]))
    return lambda lemma: grams[lemma if "_" not in lemma else tuple(lemma.split("_"))]


THE = {"Alps", "Canal", "Channel", "Desert", "Empire", "Gulf", "Islands", "Mountains", "Ocean", "Range", "Republic",
       "Revolution", "River", "Sea", "Strait", "Straits", "Valley", "War"}
UNCOUNTED = {"cattle", "clothing", "deer", "equipment", "fish", "furniture", "hardware", "humankind", "jewelry",
             "livestock", "luggage", "machinery", "mail", "mankind", "people", "poultry", "sheep", "software",
             "swine", "wildlife"}


def plural(phrase: str, irregular: dict) -> str:
    head, _, last = phrase.rpartition(" ")
    low = last.lower()
    if low.endswith("s") or low in UNCOUNTED:
        return phrase  # already a plural ("goggles") or a mass ("cattle")
    if low in irregular:
        p = irregular[low]
    elif low.endswith(("s", "x", "z", "ch", "sh")):
        p = low + "es"
    elif low.endswith("y") and low[-2:-1] not in "aeiou":
        p = low[:-1] + "ies"
    else:
        p = low + "s"
    return f"{head} {p}" if head else p


def held_out_words(index: dict, synsets: dict) -> set[str]:
    """The held-out topics' head nouns, their synonyms (every sense) and their direct hyponyms' lemmas, as
    lower-case words and phrases ("hot air balloon"); for a phrase, also its rarer nouns ("reef", "coral")."""
    from bild_kernels.distill.prompts import EVAL_TOPICS

    heads = set()
    for topic in EVAL_TOPICS:
        t = re.sub(r"^the ", "", topic.lower())
        t = re.sub(r" (making|in winter|of china)$", "", t).replace(" ", "_")
        forms = [t, t[:-1], t[:-2]]
        forms += [f.replace("_", "-", 1) for f in forms]  # "hot-air_balloon"
        heads.add(next((s for s in forms if s in index), t[:-1] if t.endswith("s") else t))
    out = set()
    for h in heads:
        out.add(h)
        words = re.split("[_-]", h)
        if len(words) > 1:
            out.update(w for w in words if len(w) >= 4 and 0 < len(index.get(w, ())) <= 5)
    for h in list(out):
        for off in index.get(h, []):
            lex, words, _, hypo = synsets[off]
            out.update(words)
            for o in hypo:
                out.update(synsets[o][1])
    return {re.sub(r"\(.*\)$", "", w).lower().replace("_", " ") for w in out}


def mentions(phrase: str, banned: set[str]) -> bool:
    words = phrase.lower().split()
    for b in banned:
        bw = b.split()
        forms = {tuple(bw), tuple(bw[:-1] + [bw[-1] + "s"]), tuple(bw[:-1] + [bw[-1] + "es"])}
        if any(tuple(words[i:i + len(bw)]) in forms for i in range(len(words) - len(bw) + 1)):
            return True
    return False


def topics(wordnet: Path, tokenizer, min_gloss_count: int) -> list[tuple[str, str, int]]:
    synsets, index = read_synsets(wordnet), read_index(wordnet)
    count = gloss_counts(wordnet)
    irregular = {}
    for line in open(wordnet / "noun.exc", encoding="latin-1"):
        p, s = line.split()[:2]
        irregular.setdefault(s, p)
    banned = held_out_words(index, synsets)
    other = {pos: read_index(wordnet, pos) for pos in ("verb", "adj", "adv")}
    out, seen = [], set()
    for lemma, offs in index.items():
        lex, words, gloss, _ = synsets[offs[0]]
        if lex not in KEEP or not LEMMA.fullmatch(lemma) or TAXON.search(lemma):
            continue
        if BLOCK.search(lemma) or any(BLOCK.search(synsets[o][2]) for o in offs):
            continue
        if "_" not in lemma and (len(lemma) < 3 or lemma in other["adv"] or lemma in other["adj"]
                                 or len(other["verb"].get(lemma, ())) > 2 * len(offs)):
            continue  # mostly another part of speech ("like", "make", "common"), or an abbreviation
        n = count(lemma)
        if n < min_gloss_count:
            continue
        if any(len(tokenizer.encode(" " + w, add_special_tokens=False)) > 2 for w in lemma.split("_")):
            continue
        written = next((w for w in words if w.lower() == lemma), lemma)
        written = re.sub(r"\(.*\)$", "", written).replace("_", " ")
        proper = written != written.lower()
        if proper and sum(c.isupper() for c in written) > len(written.split()):
            continue  # an abbreviation or a symbol ("IT", "He")
        if mentions(written, banned):
            continue
        phrase = plural(written, irregular) if lex in PLURAL and not proper else written
        if proper and not written.lower().startswith("the ") and (
                (written[0].islower() and " of " in written) or written.split()[-1] in THE):
            phrase = "the " + phrase  # "the siege of Orleans", "the Kansas River"
        if phrase.lower() in seen:
            continue
        seen.add(phrase.lower())
        out.append((phrase, lex, n))
    out.sort(key=lambda r: (-r[2], r[0]))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--wordnet", type=Path, default=Path("/usr/share/wordnet"),
                    help="WordNet 3.0's dict directory (data.noun, index.noun, noun.exc)")
    ap.add_argument("--out", type=Path, default=ROOT / "bild_kernels" / "data" / "wordnet_topics.txt")
    ap.add_argument("--min-gloss-count", type=int, default=2)
    args = ap.parse_args(argv)
    from transformers import AutoTokenizer

    from bild_kernels.models.default import default_large

    gguf = default_large()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    rows = topics(args.wordnet, tok, args.min_gloss_count)
    with open(args.out, "w") as f:
        f.write(HEADER)
        f.writelines(f"{phrase}\t{lex}\n" for phrase, lex, _ in rows)
    kinds = collections.Counter(lex for _, lex, _ in rows)
    print(f"{len(rows)} topics -> {args.out} ({', '.join(f'{k} {v}' for k, v in kinds.most_common())})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
