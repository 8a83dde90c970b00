"""The ``biography`` scenario: synthetic people, knowledge injection, then QA fine-tuning.

A CPU-sized copy of the Biography testbed of *Spurious Forgetting in Continual Learning of
Language Models* (Zheng et al., ICLR 2025), itself after Allen-Zhu & Li's *Physics of Language
Models 3.1*. Everything is built here from scratch; nothing is downloaded.

Data
    Each person has a unique full name and six attributes: birth date, birth city, university,
    major, employer and employer city. Every attribute has at least three paraphrase templates;
    a biography renders each attribute with a random template and shuffles the sentence order,
    and every sentence names the person in full. Each person gets ``bios_per_person``
    biographies. A QA prompt per attribute asks for the value
    (``"<bos> which city was anna smith born in ? answer : boston <eos>"``); the loss and the
    accuracy only cover the answer tokens.

Tokenizer and model
    A word-level tokenizer trained locally with ``tokenizers`` (every attribute value is 1-3
    tokens) and a tiny Llama (``LlamaForCausalLM`` from a config, ``attn_implementation="eager"``
    so second-order diagnostics work, untied embeddings so "freeze the embeddings" means what it
    says).

Protocol
    * Task 0, ``default`` preset (``task0_mix=True``): one stream mixing the biographies of
      population 0 and the QA of its first half ("mixed training", Allen-Zhu & Li 3.1),
      evaluated on the QA of the second half (knowledge extraction: held-out people whose
      biographies were seen, their QA never). Trained once per seed by the scenario, cached.
    * Task 0, ``v1``/``quick``/``micro``: language modelling on the biographies of population 0
      (knowledge injection), then QA fine-tuning on the first half by the harness. Extraction
      to held-out people generalises slowly this way (~45-50 % after 1500 + 150 steps, against
      ~75-90 % after 2000 mixed steps).
    * Task t = 1..T: a new population t; training batches mix its biographies and the QA of its
      first half; evaluated on the QA of its second half (the test people; ``tune_fraction`` of
      that half are tuning people, scored separately and never reported).

    ``accuracy`` is exact match of the whole answer under greedy decoding (computed with teacher
    forcing: greedy decoding reproduces the answer iff every answer token is the argmax given the
    correct prefix); ``first_token`` is the accuracy of the answer's first token.

The pretrained checkpoint, the tokenizer and the generated people are cached under
``cache_dir/biography-<hash of the config and seed>/`` (safetensors + JSON) so every method and
every later run share them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from torch import nn

from benchmarks.scenario import Scenario, Task, batch_examples, pad_batch

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------
# Vocabulary of the synthetic world
# --------------------------------------------------------------------------------------------

FIRST_NAMES = (
    "anna ben clara david emma felix grace henry iris jack kate leo maya noah olga paul rosa sam "
    "tara umar vera will xena yuri zoe adam bella carl dora eric fiona gus hana ivan june karl "
    "lena milo nina oscar pia quinn rita simon tess ugo viola wes yara zack alma boris cora "
    "dean elsa finn gina hugo"
).split()
LAST_NAMES = (
    "smith jones brown taylor wilson davies evans thomas johnson roberts walker wright robinson "
    "thompson white hughes edwards green hall wood harris lewis martin jackson clarke clark "
    "turner hill scott cooper morris ward moore king watson baker harrison morgan patel young "
    "allen mitchell james anderson phillips lee bell parker davis miller garcia"
).split()
CITIES = (
    "boston chicago denver austin seattle portland phoenix dallas miami atlanta detroit houston "
    "memphis orlando tampa omaha tucson fresno oakland raleigh madison boise reno spokane "
    "lincoln toledo dayton akron buffalo albany"
).split()
UNIVERSITIES = [
    "stanford university", "harvard university", "yale university", "cornell university",
    "duke university", "brown university", "rice university", "emory university",
    "purdue university", "tufts university", "mit", "caltech", "princeton", "columbia",
    "university of michigan", "university of oregon", "university of utah",
    "university of iowa", "university of kansas", "university of arizona",
]
MAJORS = [
    "physics", "chemistry", "biology", "mathematics", "history", "economics", "philosophy",
    "linguistics", "psychology", "sociology", "geology", "astronomy", "music", "architecture",
    "computer science", "civil engineering", "political science", "fine arts",
    "mechanical engineering", "public health",
]
COMPANIES = [
    "acme corp", "globex", "initech", "umbrella labs", "stark industries", "wayne enterprises",
    "hooli", "vandelay industries", "soylent corp", "cyberdyne systems", "tyrell corp",
    "wonka industries", "aperture science", "black mesa", "gringotts", "monarch solutions",
    "oceanic airlines", "dunder mifflin", "pied piper", "nakatomi trading",
]
MONTHS = (
    "january february march april may june july august september october november december"
).split()

ATTRIBUTES = ("birth_date", "birth_city", "university", "major", "employer", "employer_city")

BIO_TEMPLATES: dict[str, tuple[str, ...]] = {
    "birth_date": (
        "{name} was born on {value} .",
        "{name} came into this world on {value} .",
        "{name} celebrates a birthday every year on {value} .",
        "the life of {name} began on {value} .",
    ),
    "birth_city": (
        "{name} was born in {value} .",
        "{name} spent the early years in {value} .",
        "{name} has family roots in {value} .",
        "the birthplace of {name} is {value} .",
    ),
    "university": (
        "{name} studied at {value} .",
        "{name} graduated from {value} .",
        "{name} received an education at {value} .",
    ),
    "major": (
        "{name} majored in {value} .",
        "{name} focused on {value} during college .",
        "{name} earned a degree in {value} .",
    ),
    "employer": (
        "{name} works for {value} .",
        "{name} is employed by {value} .",
        "{name} has a job at {value} .",
    ),
    "employer_city": (
        "{name} works in the city of {value} .",
        "the office of {name} is located in {value} .",
        "{name} commutes to an office in {value} .",
    ),
}
QA_TEMPLATES: dict[str, str] = {
    "birth_date": "what is the birth date of {name} ? answer :",
    "birth_city": "which city was {name} born in ? answer :",
    "university": "which university did {name} attend ? answer :",
    "major": "what did {name} study ? answer :",
    "employer": "which company does {name} work for ? answer :",
    "employer_city": "which city does {name} work in ? answer :",
}
SPECIAL_TOKENS = ("[pad]", "[unk]", "[bos]", "[eos]")
PAD, UNK, BOS, EOS = SPECIAL_TOKENS


# --------------------------------------------------------------------------------------------
# Configuration and presets
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BiographyConfig:
    """Everything that defines a ``biography`` scenario (hashed into the cache key).

    Attributes:
        population: people of population 0 (pretrained; Task 0 is QA on half of them).
        new_population: people of each new population 1..T (``None``: ``population``).
        num_new_tasks: T, the number of tasks after Task 0.
        bios_per_person: biographies generated per person (random templates and order).
        hidden_size / num_layers / num_heads / intermediate_size: the tiny Llama.
        pretrain_steps / pretrain_lr / pretrain_batch: knowledge injection on population 0.
        task0_steps: training steps of Task 0 (done once per seed, cached; shared by every
            method).
        task0_mix: ``True``: Task 0 is trained like the later tasks, on a mix of population 0's
            biographies and the QA of its first half (knowledge injection and extraction
            together, "mixed training" in Allen-Zhu & Li 3.1, which lets extraction generalise
            to held-out people within ~2000 steps), at ``task0_lr`` with a 100-step warmup and a
            cosine decay to 0.1x, by the scenario itself (the model the harness gets already knows Task 0). ``False``:
            language modelling on the biographies for ``pretrain_steps``, then QA fine-tuning
            on the first half for ``task0_steps`` by the harness at ``lr``.
        task0_lr: Task 0's learning rate when ``task0_mix`` (``None``: ``pretrain_lr``).
        steps_per_task / lr / batch_size: every task's training (AdamW, constant lr).
        qa_fraction: share of QA examples in the batches of tasks 1..T (rest: biographies).
        curve_every / curve_steps: Task-0 evaluation cadence over the first steps of Task 1.
        probe_examples / recovery_examples: sizes of the diagnostic and recovery sets.
        tune_fraction: share of each population's held-out half kept as *tuning* people
            (``Task.tune_evaluate``; hyperparameters are chosen on them, never on the test
            people that ``Task.evaluate`` scores). 0: no tuning split.
    """

    population: int = 200
    new_population: int | None = None
    num_new_tasks: int = 2
    bios_per_person: int = 5
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 384
    pretrain_steps: int = 3000
    pretrain_lr: float = 3e-3
    pretrain_batch: int = 32
    task0_steps: int = 300
    task0_mix: bool = False
    task0_lr: float | None = None
    steps_per_task: int = 300
    lr: float = 1e-3
    batch_size: int = 32
    qa_fraction: float = 0.5
    curve_every: int = 10
    curve_steps: int = 150
    probe_examples: int = 32
    recovery_examples: int = 10
    tune_fraction: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.tune_fraction < 1.0:
            raise ValueError(f"tune_fraction={self.tune_fraction} must be in [0, 1) (0: no tuning people)")
        if self.population < 4 or self.population % 2:
            raise ValueError(f"population={self.population} must be an even number >= 4")
        if self.task0_mix and self.task0_steps < 1:
            raise ValueError(f"task0_steps={self.task0_steps} must be >= 1 with task0_mix=True "
                             "(the scenario trains Task 0 itself)")
        if self.num_new_tasks < 1:
            raise ValueError(f"num_new_tasks={self.num_new_tasks} must be >= 1")
        if not 0.0 < self.qa_fraction <= 1.0:
            raise ValueError(f"qa_fraction={self.qa_fraction} must be in (0, 1]")
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size={self.hidden_size} must be divisible by num_heads={self.num_heads}"
            )
        if self.new_population is not None and (self.new_population < 2 or self.new_population % 2):
            raise ValueError(f"new_population={self.new_population} must be an even number >= 2")
        needed = self.population + self.new_population_size * self.num_new_tasks
        available = len(FIRST_NAMES) * len(LAST_NAMES)
        if needed > available:
            raise ValueError(
                f"population + new_population * num_new_tasks = {needed} exceeds the {available} unique "
                "full names; lower population or num_new_tasks"
            )

    @property
    def new_population_size(self) -> int:
        return self.population if self.new_population is None else self.new_population

    def key(self, seed: int) -> str:
        """Short hash of the whole config and seed (the data's cache directory)."""
        return _hash({**asdict(self), "seed": seed, "version": 3})

    def pretrain_key(self, seed: int) -> str:
        """Short hash of what the pretrained checkpoint depends on (shared by configs that
        differ only in the later tasks)."""
        fields = ("population", "bios_per_person", "hidden_size", "num_layers", "num_heads",
                  "intermediate_size", "pretrain_steps", "pretrain_lr", "pretrain_batch")
        if self.task0_mix:  # the checkpoint then holds Task 0 too
            fields += ("task0_mix", "task0_steps", "task0_lr", "qa_fraction", "batch_size")
        return _hash({**{f: getattr(self, f) for f in fields}, "seed": seed, "version": 2,
                      **({"mix_version": 3} if self.task0_mix else {})})


def _hash(blob: dict) -> str:
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:12]


PRESETS: dict[str, BiographyConfig] = {
    # seconds: used by the tests
    "micro": BiographyConfig(
        population=16, num_new_tasks=1, bios_per_person=2, hidden_size=32, num_layers=2,
        num_heads=2, intermediate_size=64, pretrain_steps=30, pretrain_batch=16, task0_steps=10,
        steps_per_task=8, batch_size=8, curve_every=4, curve_steps=8, probe_examples=8,
        recovery_examples=4, tune_fraction=0.25,
    ),
    # a smoke run: compare.py --quick runs 6 methods x 2 seeds in about 3 minutes on 2 CPU cores
    # (seq keeps ~35-40% of Task 0; Task 0 scored on 144 items, the new task on 96)
    "quick": BiographyConfig(
        population=48, new_population=32, num_new_tasks=1, bios_per_person=4, hidden_size=64,
        num_layers=4, num_heads=4, intermediate_size=128, pretrain_steps=600, task0_steps=100,
        steps_per_task=60, batch_size=16, curve_every=5, curve_steps=60, probe_examples=24,
    ),
    # built to measure (issue 14): Task 0 scored on 612 held-out items (102 test people; 26
    # more are tuning people) and learned by mixed training (every biography and training QA
    # once per epoch; held-out accuracy at constant lr, seeds 0 / 1: 64 / 49 % after 1200 steps,
    # 89 / 74 % after 2000, hence 2000 steps with a cosine decay); 3 later tasks of 84 people,
    # each scored on 204 test items and trained 200 steps (seed 0: seq's new-task accuracy at
    # 200 steps is 94 / 97 / 97 % of its 400-step maximum)
    "default": BiographyConfig(
        population=256, new_population=84, num_new_tasks=3, bios_per_person=5, hidden_size=64,
        num_layers=4, num_heads=4, intermediate_size=256, pretrain_steps=0, task0_mix=True,
        task0_steps=2000, task0_lr=3e-3, steps_per_task=200, lr=1e-3, batch_size=16,
        qa_fraction=0.4, curve_every=10, curve_steps=150, probe_examples=32, tune_fraction=0.2,
    ),
    # the previous default (v1: 300 / 150 scored items, Task 0 at ~50 %), kept to reproduce
    # the v1 tables of docs/BENCHMARKS.md
    "v1": BiographyConfig(
        population=100, new_population=50, num_new_tasks=2, bios_per_person=4, hidden_size=64,
        num_layers=4, num_heads=4, intermediate_size=192, pretrain_steps=1500, task0_steps=150,
        steps_per_task=150, batch_size=16, curve_every=10, curve_steps=150, probe_examples=32,
    ),
}

# the spurious-forgetting regime (issue 14, item 1): the default preset with the later tasks
# trained at a tenth of its lr (1e-4; Task 0 and its cached model are the default preset's)
PRESETS["lowlr"] = replace(PRESETS["default"], lr=1e-4)


# --------------------------------------------------------------------------------------------
# Generator
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Person:
    """One synthetic person: a unique full name and one value per attribute of ``ATTRIBUTES``."""

    name: str
    birth_date: str
    birth_city: str
    university: str
    major: str
    employer: str
    employer_city: str

    def value(self, attribute: str) -> str:
        return getattr(self, attribute)


def generate_people(n: int, rng: random.Random, exclude: set[str] | None = None) -> list[Person]:
    """``n`` people with full names unique among themselves and not in ``exclude``.

    Args:
        n: how many.
        rng: source of randomness (``random.Random(seed)``).
        exclude: full names already used (e.g. by earlier populations); updated in place.

    Returns:
        ``n`` :class:`Person` objects.

    Raises:
        ValueError: when fewer than ``n`` unused full names remain.
    """
    used = exclude if exclude is not None else set()
    names = [f"{f} {s}" for f in FIRST_NAMES for s in LAST_NAMES]
    free = [x for x in names if x not in used]
    if len(free) < n:
        raise ValueError(f"asked for {n} people but only {len(free)} unused full names remain")
    chosen = rng.sample(free, n)
    used.update(chosen)
    people = []
    for name in chosen:
        date = f"{rng.choice(MONTHS)} {rng.randint(1, 28)} , {rng.randint(1950, 1999)}"
        people.append(
            Person(
                name=name,
                birth_date=date,
                birth_city=rng.choice(CITIES),
                university=rng.choice(UNIVERSITIES),
                major=rng.choice(MAJORS),
                employer=rng.choice(COMPANIES),
                employer_city=rng.choice(CITIES),
            )
        )
    return people


def biography(person: Person, rng: random.Random) -> str:
    """One biography: each attribute in a random template, sentences in random order."""
    sentences = [
        rng.choice(BIO_TEMPLATES[a]).format(name=person.name, value=person.value(a))
        for a in ATTRIBUTES
    ]
    rng.shuffle(sentences)
    return " ".join(sentences)


def qa_pair(person: Person, attribute: str) -> tuple[str, str]:
    """``(prompt, answer)`` for one attribute of one person."""
    return QA_TEMPLATES[attribute].format(name=person.name), person.value(attribute)


@dataclass
class BiographyData:
    """Generated people: ``populations[0]`` is pretrained, ``populations[t]`` is task t's."""

    populations: list[list[Person]]
    bios: list[list[str]]  # bios[t]: every biography of population t (bios_per_person each)

    def qa_split(self, t: int) -> tuple[list[Person], list[Person]]:
        """(QA-trained half, held-out evaluation half) of population ``t``."""
        pop = self.populations[t]
        return pop[: len(pop) // 2], pop[len(pop) // 2 :]

    def tune_test_split(self, t: int, tune_fraction: float) -> tuple[list[Person], list[Person]]:
        """(tuning people, test people): the held-out half of population ``t`` cut in two, the
        first ``round(tune_fraction · n)`` people for tuning (none when 0)."""
        held = self.qa_split(t)[1]
        k = round(tune_fraction * len(held))
        return held[:k], held[k:]

    def to_json(self) -> dict:
        return {"populations": [[asdict(p) for p in pop] for pop in self.populations],
                "bios": self.bios}

    @classmethod
    def from_json(cls, blob: dict) -> BiographyData:
        return cls([[Person(**p) for p in pop] for pop in blob["populations"]], blob["bios"])


def generate_data(cfg: BiographyConfig, seed: int) -> BiographyData:
    """All populations and biographies of a scenario, deterministic in ``seed``.

    Population ``t`` draws from its own ``random.Random`` (seeded by ``seed`` and ``t``) after
    the earlier populations' names are taken, so population 0 (and the pretraining on it) does
    not depend on the settings of the later tasks.
    """
    used: set[str] = set()
    pops, bios = [], []
    for t in range(cfg.num_new_tasks + 1):
        rng = random.Random(seed * 1_000_003 + t)
        pop = generate_people(cfg.population if t == 0 else cfg.new_population_size, rng, used)
        pops.append(pop)
        bios.append([biography(p, rng) for p in pop for _ in range(cfg.bios_per_person)])
    return BiographyData(pops, bios)


# --------------------------------------------------------------------------------------------
# Tokenizer and model
# --------------------------------------------------------------------------------------------


def corpus_words() -> list[str]:
    """Every text the tokenizer must cover: templates and all attribute values and names."""
    texts = [t for ts in BIO_TEMPLATES.values() for t in ts] + list(QA_TEMPLATES.values())
    texts += FIRST_NAMES + LAST_NAMES + CITIES + UNIVERSITIES + MAJORS + COMPANIES + MONTHS
    texts += [str(d) for d in range(1, 32)] + [str(y) for y in range(1900, 2030)] + [","]
    return texts


def build_tokenizer():
    """Word-level ``tokenizers.Tokenizer`` trained on :func:`corpus_words` (deterministic).

    Raises:
        ScenarioUnavailable: when ``tokenizers`` is not installed.
    """
    try:
        from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    except ImportError as err:  # pragma: no cover - tokenizers ships with transformers
        from benchmarks.scenario import ScenarioUnavailable

        raise ScenarioUnavailable("the biography scenario needs `pip install tokenizers`") from err
    tok = Tokenizer(models.WordLevel(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    trainer = trainers.WordLevelTrainer(special_tokens=list(SPECIAL_TOKENS), min_frequency=1)
    tok.train_from_iterator([t.replace("{name}", "").replace("{value}", "")
                             for t in corpus_words()], trainer=trainer)
    return tok


class WordCodec:
    """Encode texts to ids and build padded batches (``input_ids``, ``attention_mask``, ``labels``)."""

    def __init__(self, tokenizer) -> None:
        self.tok = tokenizer
        self.pad_id = tokenizer.token_to_id(PAD)
        self.bos_id = tokenizer.token_to_id(BOS)
        self.eos_id = tokenizer.token_to_id(EOS)
        self.unk_id = tokenizer.token_to_id(UNK)
        self.vocab_size = tokenizer.get_vocab_size()

    def ids(self, text: str) -> list[int]:
        out = self.tok.encode(text).ids
        if self.unk_id in out:
            raise ValueError(f"text has out-of-vocabulary words: {text!r}")
        return out

    def lm_example(self, text: str) -> tuple[list[int], list[int]]:
        ids = [self.bos_id, *self.ids(text), self.eos_id]
        return ids, list(ids)

    def qa_example(self, prompt: str, answer: str) -> tuple[list[int], list[int]]:
        p = [self.bos_id, *self.ids(prompt)]
        a = [*self.ids(answer), self.eos_id]
        return p + a, [-100] * len(p) + a

    def collate(self, examples: Sequence[tuple[list[int], list[int]]]) -> dict[str, torch.Tensor]:
        """Right-padded batch (:func:`benchmarks.scenario.pad_batch`); ``labels`` is ``-100`` on
        prompts and padding."""
        return pad_batch(examples, self.pad_id)

    def batches(self, examples, batch_size: int, rng: random.Random | None = None):
        """Batches of ``batch_size`` (shuffled with ``rng`` when given; last one may be short)."""
        return batch_examples(examples, batch_size, self.pad_id, rng)


def build_model(cfg: BiographyConfig, vocab_size: int, seed: int) -> nn.Module:
    """A freshly initialised tiny Llama (eager attention, untied embeddings), CPU fp32."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        "llama",
        vocab_size=vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_heads,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        attn_implementation="eager",
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=3,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    return model.float()


# --------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def answer_accuracy(model: nn.Module, batches: list[dict[str, torch.Tensor]], eos_id: int
                    ) -> dict[str, float]:
    """Exact-match and first-token accuracy of the answers of QA ``batches``.

    Answer positions are those with ``labels != -100`` other than the final ``eos``. Greedy
    decoding reproduces the answer iff each answer token is the argmax given the true prefix,
    so one teacher-forced forward pass per batch gives the greedy exact match.

    Returns:
        ``{"accuracy": exact match, "exact": same, "first_token": ..., "loss": mean answer NLL,
        "items": per-item exact match (0/1, in batch order), "item_nll": per-item mean answer
        NLL}`` — the per-item lists let two methods be compared on the same items (McNemar).
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    exact = first = total = 0
    nll_sum = nll_n = 0.0
    items: list[int] = []
    item_nll: list[float] = []
    try:
        for batch in batches:
            batch = {k: v.to(device) for k, v in batch.items()}
            logits = model(input_ids=batch["input_ids"],
                           attention_mask=batch["attention_mask"]).logits[:, :-1]  # (B, L-1, V)
            target = batch["labels"][:, 1:]  # (B, L-1)
            answer = (target != -100) & (target != eos_id)
            pred = logits.argmax(-1)
            correct = (pred == target) | ~answer
            row_exact = correct.all(dim=1)
            exact += int(row_exact.sum())
            items += [int(x) for x in row_exact.tolist()]
            first_pos = answer.float().argmax(dim=1)  # first answer position per row
            rows = torch.arange(target.shape[0], device=device)
            first += int((pred[rows, first_pos] == target[rows, first_pos]).sum())
            total += target.shape[0]
            logp = torch.log_softmax(logits.float(), -1)
            tok_nll = -logp.gather(-1, target.clamp_min(0).unsqueeze(-1)).squeeze(-1)
            nll_sum += float(tok_nll[answer].sum())
            nll_n += float(answer.sum())
            per_row = (tok_nll * answer).sum(1) / answer.sum(1).clamp_min(1)
            item_nll += [float(x) for x in per_row.tolist()]
    finally:
        model.train(was_training)
    return {"accuracy": exact / total, "exact": exact / total, "first_token": first / total,
            "loss": nll_sum / max(nll_n, 1.0), "items": items, "item_nll": item_nll}


# --------------------------------------------------------------------------------------------
# Training helpers (pretraining only; the harness trains the tasks)
# --------------------------------------------------------------------------------------------


def train_steps(model: nn.Module, batches: list[dict[str, torch.Tensor]], steps: int, lr: float,
                seed: int, desc: str = "train", warmup: int = 0, cosine: bool = False) -> None:
    """Plain AdamW over ``steps`` batches drawn cyclically from ``batches`` (reshuffled per epoch)."""
    from tqdm.auto import tqdm

    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = None
    if warmup or cosine:
        import math

        def factor(i: int) -> float:
            if i < warmup:
                return (i + 1) / warmup
            if not cosine:
                return 1.0
            return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (i - warmup) / max(1, steps - warmup)))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    rng = random.Random(seed)
    order: list[int] = []
    model.train()
    for _ in tqdm(range(steps), desc=desc, leave=False, mininterval=1.0):
        if not order:
            order = list(range(len(batches)))
            rng.shuffle(order)
        loss = model(**batches[order.pop()]).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if sched is not None:
            sched.step()
    opt.zero_grad(set_to_none=True)


# --------------------------------------------------------------------------------------------
# Scenario
# --------------------------------------------------------------------------------------------


def resolve_config(preset: str | BiographyConfig, **overrides) -> BiographyConfig:
    """A preset name (``micro``/``quick``/``default``) or a config, with field overrides."""
    if isinstance(preset, BiographyConfig):
        cfg = preset
    elif preset in PRESETS:
        cfg = PRESETS[preset]
    else:
        raise ValueError(f"unknown biography preset {preset!r}; choose one of {sorted(PRESETS)}")
    return replace(cfg, **overrides) if overrides else cfg


def _qa_examples(codec: WordCodec, people: Sequence[Person]) -> list[tuple[list[int], list[int]]]:
    return [codec.qa_example(*qa_pair(p, a)) for p in people for a in ATTRIBUTES]


def _mix_size(cfg: BiographyConfig, n_bios: int, n_qa: int) -> tuple[int, int]:
    """(biographies, QA examples) in a mixed stream at ``cfg.qa_fraction``: every biography and
    every QA example at least once, the smaller side repeated up to the ratio (QA alone when
    ``qa_fraction`` is 1)."""
    q = cfg.qa_fraction
    if q >= 1:
        return 0, n_qa
    want_qa = round(n_bios * q / (1 - q))
    if want_qa >= n_qa:
        return n_bios, want_qa
    return round(n_qa * (1 - q) / q), n_qa


def _mixed_examples(cfg: BiographyConfig, codec: WordCodec, data: BiographyData, t: int
                    ) -> list[tuple[list[int], list[int]]]:
    """Population ``t``'s training stream: its biographies and the QA of its first half, each at
    least once, the smaller side repeated so that QA is ``qa_fraction`` of the stream (QA alone
    when it is 1)."""
    qa_train = _qa_examples(codec, data.qa_split(t)[0])
    if cfg.qa_fraction >= 1:
        return qa_train
    bios = [codec.lm_example(b) for b in data.bios[t]]
    n_bios, n_qa = _mix_size(cfg, len(bios), len(qa_train))
    return [bios[i % len(bios)] for i in range(n_bios)] + [qa_train[i % len(qa_train)] for i in range(n_qa)]


def describe(preset: str | BiographyConfig = "quick", **overrides) -> dict:
    """What a run of this scenario scores, from its config alone (nothing is built or trained).

    Returns:
        ``{"tasks": [{"name", "eval_items", "train_examples"}], "general": [], "steps_per_task",
        "task0_steps"}``: Task 0 scores the QA of the held-out half of population 0 (one item
        per person and attribute), task ``t`` that of population ``t``'s held-out half.
    """
    cfg = resolve_config(preset, **overrides)
    per_person = len(ATTRIBUTES)
    def held(n: int) -> tuple[int, int]:  # (test, tuning) items of a population of n
        k = round(cfg.tune_fraction * (n - n // 2))
        return (n - n // 2 - k) * per_person, k * per_person

    def mixed(n: int) -> int:  # examples in a population's mixed training stream
        qa, bios = n // 2 * per_person, n * cfg.bios_per_person
        return sum(_mix_size(cfg, bios, qa))

    test0, tune0 = held(cfg.population)
    tasks = [{"name": "task0", "eval_items": test0, "tune_items": tune0,
              "train_examples": mixed(cfg.population) if cfg.task0_mix else cfg.population // 2 * per_person}]
    n = cfg.new_population_size
    for t in range(1, cfg.num_new_tasks + 1):
        test, tune = held(n)
        tasks.append({"name": f"task{t}", "eval_items": test, "tune_items": tune, "train_examples": mixed(n)})
    return {"tasks": tasks, "general": [], "steps_per_task": cfg.steps_per_task, "task0_steps": cfg.task0_steps}


def build_scenario(preset: str | BiographyConfig = "quick", cache_dir: str | Path =
                   ".cache/mitigate-bench", seed: int = 0, **overrides) -> Scenario:
    """Build (or load from cache) the ``biography`` scenario.

    Args:
        preset: ``"micro"`` (tests), ``"quick"``, ``"default"`` or a :class:`BiographyConfig`.
        cache_dir: where the pretrained checkpoint, tokenizer and people are cached.
        seed: seeds the people, the biographies, the model initialisation and pretraining.
        **overrides: :class:`BiographyConfig` fields to change.

    Returns:
        A :class:`Scenario` whose ``model_factory`` returns the pretrained model: with
        ``task0_mix`` it already knows Task 0 (``first_task_pretrained=True``), otherwise the
        harness trains Task 0 on it.
    """
    from safetensors.torch import load_file, save_file

    cfg = resolve_config(preset, **overrides)
    cache = Path(cache_dir) / f"biography-{cfg.key(seed)}"
    cache.mkdir(parents=True, exist_ok=True)

    data_path, tok_path = cache / "data.json", cache / "tokenizer.json"
    ckpt_path = Path(cache_dir) / f"biography-pretrained-{cfg.pretrain_key(seed)}.safetensors"
    if data_path.exists():
        data = BiographyData.from_json(json.loads(data_path.read_text()))
    else:
        data = generate_data(cfg, seed)
        data_path.write_text(json.dumps(data.to_json()))
    if tok_path.exists():
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(str(tok_path))
    else:
        tokenizer = build_tokenizer()
        tokenizer.save(str(tok_path))
    codec = WordCodec(tokenizer)

    rng = random.Random(seed + 1)
    task0_train = codec.batches(_mixed_examples(cfg, codec, data, 0) if cfg.task0_mix
                                else _qa_examples(codec, data.qa_split(0)[0]), cfg.batch_size, rng)
    if ckpt_path.exists():
        pretrained = load_file(str(ckpt_path))
    else:
        model = build_model(cfg, codec.vocab_size, seed)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # a tiny model: threads only add synchronisation
        try:
            if cfg.pretrain_steps:
                bios = [codec.lm_example(b) for b in data.bios[0]]
                batches = codec.batches(bios, cfg.pretrain_batch, random.Random(seed))
                log.info("pretraining biography model (%d steps), cached at %s", cfg.pretrain_steps, ckpt_path)
                train_steps(model, batches, cfg.pretrain_steps, cfg.pretrain_lr, seed,
                            desc="pretrain", warmup=min(100, cfg.pretrain_steps // 10), cosine=True)
            if cfg.task0_mix:
                log.info("training Task 0 (biographies + QA, %d steps), cached at %s", cfg.task0_steps, ckpt_path)
                train_steps(model, task0_train, cfg.task0_steps,
                            cfg.pretrain_lr if cfg.task0_lr is None else cfg.task0_lr, seed + 3,
                            desc="task0 (mixed)", warmup=min(100, cfg.task0_steps // 10), cosine=True)
        finally:
            torch.set_num_threads(threads)
        pretrained = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
        save_file(pretrained, str(ckpt_path))

    def model_factory() -> nn.Module:
        model = build_model(cfg, codec.vocab_size, seed)
        model.load_state_dict(pretrained)
        return model

    tasks = []
    for t in range(cfg.num_new_tasks + 1):
        train_people = data.qa_split(t)[0]
        tune_people, eval_people = data.tune_test_split(t, cfg.tune_fraction)
        qa_train = _qa_examples(codec, train_people)
        qa_eval = _qa_examples(codec, eval_people)
        qa_tune = _qa_examples(codec, tune_people)
        train = task0_train if t == 0 else codec.batches(_mixed_examples(cfg, codec, data, t),
                                                         cfg.batch_size, rng)
        eval_batches = codec.batches(qa_eval, 256)
        probe_rng = random.Random(seed + 100 + t)
        probe = codec.batches(probe_rng.sample(qa_eval, min(cfg.probe_examples, len(qa_eval))),
                              cfg.probe_examples)
        recovery = codec.batches(
            probe_rng.sample(qa_train, min(cfg.recovery_examples, len(qa_train))),
            cfg.recovery_examples)

        def evaluate(model: nn.Module, _b=eval_batches) -> dict[str, float]:
            return answer_accuracy(model, _b, codec.eos_id)

        tune_evaluate = None
        if qa_tune:
            def tune_evaluate(model: nn.Module, _b=codec.batches(qa_tune, 256)) -> dict[str, float]:
                return answer_accuracy(model, _b, codec.eos_id)

        tasks.append(Task(name=f"task{t}", train=train, evaluate=evaluate, probe=probe,
                          recovery=recovery, tune_evaluate=tune_evaluate))

    return Scenario(
        name="biography",
        model_factory=model_factory,
        tasks=tasks,
        steps_per_task=cfg.steps_per_task,
        lr=cfg.lr,
        first_task_pretrained=cfg.task0_mix,
        notes=(f"biography: {cfg.population} people/population, T={cfg.num_new_tasks}, "
               f"{cfg.num_layers}x{cfg.hidden_size} Llama, vocab {codec.vocab_size}"),
        task0_steps=cfg.task0_steps,
        task0_curve_every=cfg.curve_every,
        task0_curve_steps=cfg.curve_steps,
        cpu_threads=1,
        config={"scenario": "biography", "seed": seed, "key": cfg.key(seed),
                "task0_steps": cfg.task0_steps, **asdict(cfg)},
    )
