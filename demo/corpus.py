"""Deterministic synthetic multi-domain corpus for the cargo-moe-inspect demo model.

Pure Python, no downloads. Six text domains with clearly different surface
statistics so that a small Mixture-of-Experts model has something to specialise
its experts on:

    math    arithmetic facts            "17 + 25 = 42"
    code    Python-like functions       "def add_items(x, y):\n    return x + y"
    prose   templated English sentences "The old farmer walked to the river ..."
    json    JSON records                {"id": 12, "name": "alice", ...}
    csv     comma-separated tables      "city,year,population\nParis,1990,..."
    french  French-like sentences       "Le petit chat mange une pomme ..."

Usage:
    from corpus import DOMAINS, sample, make_corpus
    docs = make_corpus(seed=0, n_per_domain=1000)   # list of (domain, text)

Running the module prints a few samples of every domain.
"""

import random

DOMAINS = ["math", "code", "prose", "json", "csv", "french"]

# --------------------------------------------------------------------- math

def gen_math(rng):
    lines = []
    for _ in range(rng.randint(3, 6)):
        op = rng.choice(["+", "-", "*", "+", "-"])
        if op == "*":
            a, b = rng.randint(2, 19), rng.randint(2, 12)
            c = a * b
        else:
            a, b = rng.randint(1, 99), rng.randint(1, 99)
            if op == "-" and b > a:
                a, b = b, a
            c = a + b if op == "+" else a - b
        lines.append(f"{a} {op} {b} = {c}")
    return "\n".join(lines)

# --------------------------------------------------------------------- code

_VARS = ["x", "y", "n", "i", "total", "count", "items", "value", "result", "data", "key", "acc"]
_VERBS = ["add", "get", "sum", "count", "find", "load", "parse", "update", "compute", "filter"]
_NOUNS = ["items", "values", "users", "rows", "scores", "names", "total", "index", "config", "list"]


def gen_code(rng):
    name = f"{rng.choice(_VERBS)}_{rng.choice(_NOUNS)}"
    a, b = rng.sample(_VARS, 2)
    kind = rng.randint(0, 3)
    if kind == 0:
        body = [f"def {name}({a}, {b}):", f"    return {a} {rng.choice(['+', '-', '*'])} {b}"]
    elif kind == 1:
        body = [
            f"def {name}({a}):",
            "    result = 0",
            f"    for i in range({a}):",
            f"        result += i * {rng.randint(2, 9)}",
            "    return result",
        ]
    elif kind == 2:
        body = [
            f"def {name}({a}, {b}):",
            f"    if {a} > {b}:",
            f"        return {a}",
            "    else:",
            f"        return {b}",
        ]
    else:
        body = [
            f"def {name}({a}):",
            "    out = []",
            f"    for item in {a}:",
            f"        if item % {rng.randint(2, 5)} == 0:",
            "            out.append(item)",
            "    return out",
        ]
    if rng.random() < 0.5:
        body.append("")
        body.append(f"print({name}({rng.randint(1, 20)}))")
    return "\n".join(body)

# -------------------------------------------------------------------- prose

_ADJ = ["old", "young", "quiet", "tired", "happy", "small", "brave", "clever", "kind", "curious"]
_PERSON = ["farmer", "teacher", "doctor", "child", "woman", "man", "sailor", "baker", "girl", "boy"]
_PLACE = ["river", "market", "forest", "village", "garden", "station", "library", "harbor", "hill", "school"]
_WVERB = ["walked to", "ran to", "looked at", "waited near", "returned to", "painted", "visited"]
_TIME = ["in the morning", "at noon", "after dinner", "before sunrise", "on Sunday", "late at night"]
_REASON = ["because it was raining", "because the sun was warm", "to meet a friend",
           "to buy some bread", "to read a book", "to find the lost dog"]


def gen_prose(rng):
    sents = []
    for _ in range(rng.randint(2, 4)):
        s = (f"The {rng.choice(_ADJ)} {rng.choice(_PERSON)} {rng.choice(_WVERB)} the "
             f"{rng.choice(_PLACE)} {rng.choice(_TIME)} {rng.choice(_REASON)}.")
        sents.append(s)
    if rng.random() < 0.5:
        sents.append(f"Everyone in the {rng.choice(_PLACE)} was {rng.choice(_ADJ)} that day.")
    return " ".join(sents)

# --------------------------------------------------------------------- json

_FIRST = ["alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi", "ivan", "judy"]
_CITY = ["paris", "berlin", "tokyo", "lima", "oslo", "cairo", "rome", "delhi", "quito", "seoul"]


def gen_json(rng):
    recs = []
    for _ in range(rng.randint(1, 3)):
        fields = [f'"id": {rng.randint(1, 999)}', f'"name": "{rng.choice(_FIRST)}"']
        if rng.random() < 0.7:
            fields.append(f'"age": {rng.randint(18, 90)}')
        if rng.random() < 0.7:
            fields.append(f'"city": "{rng.choice(_CITY)}"')
        if rng.random() < 0.5:
            fields.append(f'"active": {rng.choice(["true", "false"])}')
        if rng.random() < 0.4:
            tags = ", ".join(f'"{t}"' for t in rng.sample(["red", "blue", "green", "admin", "guest", "new"], 2))
            fields.append(f'"tags": [{tags}]')
        recs.append("{" + ", ".join(fields) + "}")
    return "\n".join(recs)

# ---------------------------------------------------------------------- csv

_CSV_CITY = ["Paris", "Berlin", "Tokyo", "Lima", "Oslo", "Cairo", "Rome", "Delhi"]
_PRODUCT = ["apple", "pear", "lamp", "chair", "pen", "cable", "phone", "desk"]


def gen_csv(rng):
    if rng.random() < 0.5:
        rows = ["city,year,population"]
        for _ in range(rng.randint(3, 5)):
            rows.append(f"{rng.choice(_CSV_CITY)},{rng.randint(1950, 2024)},{rng.randint(100, 9999) * 1000}")
    else:
        rows = ["product,qty,price"]
        for _ in range(rng.randint(3, 5)):
            rows.append(f"{rng.choice(_PRODUCT)},{rng.randint(1, 50)},{rng.randint(1, 999)}.{rng.randint(0, 99):02d}")
    return "\n".join(rows)

# ------------------------------------------------------------------- french

_FR_SUJ = ["Le petit chat", "La vieille femme", "Mon ami", "Le boulanger", "La jeune fille",
           "Notre voisin", "Le professeur", "Ma soeur"]
_FR_VERB = ["mange", "regarde", "achete", "cherche", "prend", "aime", "trouve"]
_FR_OBJ = ["une pomme", "le journal", "du pain", "un livre", "la maison", "des fleurs", "le fromage"]
_FR_LIEU = ["dans le jardin", "au marche", "pres de la riviere", "a la gare", "dans la cuisine",
            "sous le pont"]
_FR_TEMPS = ["ce matin", "le soir", "chaque jour", "hier", "demain", "pendant la nuit"]


def gen_french(rng):
    sents = []
    for _ in range(rng.randint(2, 4)):
        sents.append(f"{rng.choice(_FR_SUJ)} {rng.choice(_FR_VERB)} {rng.choice(_FR_OBJ)} "
                     f"{rng.choice(_FR_LIEU)} {rng.choice(_FR_TEMPS)}.")
    if rng.random() < 0.4:
        sents.append("Il fait beau et nous sommes contents.")
    return " ".join(sents)

# ------------------------------------------------------------------------

GENERATORS = {
    "math": gen_math,
    "code": gen_code,
    "prose": gen_prose,
    "json": gen_json,
    "csv": gen_csv,
    "french": gen_french,
}


def sample(domain, rng):
    """One document of the given domain, drawn from `rng` (a random.Random)."""
    return GENERATORS[domain](rng)


def make_corpus(seed=0, n_per_domain=1000):
    """A deterministic list of (domain, text), n_per_domain documents per domain, interleaved."""
    rng = random.Random(seed)
    docs = []
    for _ in range(n_per_domain):
        for d in DOMAINS:
            docs.append((d, sample(d, rng)))
    return docs


if __name__ == "__main__":
    r = random.Random(0)
    for d in DOMAINS:
        print(f"=== {d}")
        print(sample(d, r))
        print()
