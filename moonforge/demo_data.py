"""The demo's data, generated: an invented world of facts, written as a corpus, as instructions and as exams.

Four topics (the colour of invented flowers, sums of two numbers, the country of invented cities, the food of
invented animals), each examined as one lm-eval subject of CMMLU or C-Eval. Every topic has four possible
answers, always offered in the same order as options A-D, and its facts use each answer equally often, so
answering with any fixed letter scores 25%.

- The pretraining corpus (JSONL, ``text``) states every fact, in several sentence templates and as a question
  followed by its answer.
- The instruction data (alpaca JSON with a ``system`` field) asks about every fact as multiple-choice questions
  laid out as lm-eval's CMMLU and C-Eval prompts, answered by a letter, in each topic's practice phrasings.
- The exams, in CMMLU's and C-Eval's own file layouts, ask about the same facts in a phrasing that neither the
  corpus nor the instruction data uses.

Every word comes from the lists below (names are random pairs of syllables); nothing is taken from existing text.
"""

from __future__ import annotations

import csv
import io
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

from moonforge.utils import atomic_write_text

LETTERS = ("A", "B", "C", "D")
# Instruction used when lm-eval's task description for a subject is not available.
FALLBACK_DESCRIPTION = "以下是单项选择题，请直接给出正确答案的选项。\n\n"

_FIRST = "阿巴卡达埃法伽哈伊杰克拉玛纳欧帕奇瑞萨塔乌维夏雅泽布蒙洛琪索"
_SECOND = "林山河木云岚川谷峰溪湖原岩泉森苗莲桐枫松竹梅兰菊荷"


@dataclass(frozen=True)
class Topic:
    """One kind of fact, examined as one lm-eval subject.

    ``exam``, ``drills``, ``statements`` and ``explanation`` are templates over ``{e}`` (the entity) and ``{v}``
    (its value); ``values`` are the four possible answers, in the order they are offered.
    """

    benchmark: str  # "cmmlu" or "ceval"
    subject: str  # lm-eval's subject name (task cmmlu_<subject> or ceval-valid_<subject>)
    exam: str  # the exam's question
    drills: tuple[str, ...]  # the instruction data's questions
    statements: tuple[str, ...]
    explanation: str
    values: tuple[str, str, str, str]
    facts: tuple[tuple[str, str], ...]

    @property
    def task(self) -> str:
        return f"cmmlu_{self.subject}" if self.benchmark == "cmmlu" else f"ceval-valid_{self.subject}"


@dataclass(frozen=True)
class Question:
    topic: Topic
    template: str
    entity: str
    value: str

    @property
    def text(self) -> str:
        return self.template.format(e=self.entity)

    @property
    def answer(self) -> str:
        return LETTERS[self.topic.values.index(self.value)]

    def prompt(self) -> str:
        """The question as lm-eval's CMMLU and C-Eval tasks lay it out (their ``doc_to_text``)."""
        lines = [self.text] + [f"{letter}. {option}" for letter, option in zip(LETTERS, self.topic.values)]
        return "\n".join(lines) + "\n答案："


@dataclass(frozen=True)
class DemoSize:
    """How much data to generate: the full demo, or the shortened one of ``--quick``."""

    facts: int = 24  # per topic: a multiple of 4 (each answer equally often), at most 64
    corpus_mentions: int = 12  # times each fact is stated in the pretraining corpus
    facts_per_document: int = 6
    dev_questions: int = 5  # per subject: the few-shot split (dev), from the instruction data

    def __post_init__(self):
        if self.facts % 4 or not 4 <= self.facts <= 64:
            raise ValueError(f"facts per topic must be a multiple of 4 from 4 to 64, got {self.facts}")


FULL = DemoSize()
QUICK = DemoSize(facts=16)


@dataclass
class DemoData:
    """Paths of the generated files and what they hold."""

    corpus: Path
    sft: Path
    lexicon: Path
    eval_dir: Path
    topics: list[Topic]
    exam: list[Question]
    practice: list[Question]
    corpus_documents: int

    def summary(self) -> dict:
        return {"corpus": str(self.corpus), "corpus_documents": self.corpus_documents, "sft": str(self.sft),
                "sft_samples": len(self.practice), "eval_dir": str(self.eval_dir), "exam_questions": len(self.exam),
                "tasks": [t.task for t in self.topics]}


def build_topics(size: DemoSize, rng: random.Random) -> list[Topic]:
    """The four topics with invented entities: two examined as CMMLU subjects, two as C-Eval subjects."""
    n = size.facts
    names = _invented_names(rng, 3 * n + 4)
    countries = tuple(name + "国" for name in names[3 * n:])
    colours = ("红色", "黄色", "蓝色", "白色")
    foods = ("青草", "小鱼", "果子", "昆虫")
    # Sums 17 to 20 of two numbers from 1 to 19: 16 to 19 ordered pairs each, enough for 64 facts.
    sums = ("17", "18", "19", "20")
    arithmetic = [(f"{a}加{int(s) - a}", s) for s in sums for a in range(1, 20) if 1 <= int(s) - a <= 19]
    return [
        Topic("cmmlu", "elementary_commonsense",
              exam="{e}是什么颜色的？", drills=("{e}的颜色是什么？", "{e}开什么颜色的花？"),
              statements=("{e}是{v}的。", "{e}的颜色是{v}。", "人们见到的{e}总是{v}的。"),
              explanation="{e}的颜色是{v}。", values=colours,
              facts=_assign([name + "花" for name in names[:n]], colours, rng)),
        Topic("cmmlu", "elementary_mathematics",
              exam="{e}等于多少？", drills=("{e}的结果是多少？", "算一算，{e}得几？"),
              statements=("{e}等于{v}。", "{e}的结果是{v}。", "算一算，{e}得{v}。"),
              explanation="{e}等于{v}。", values=sums, facts=_balanced(arithmetic, sums, n, rng)),
        Topic("ceval", "high_school_geography",
              exam="{e}位于哪个国家？",
              drills=("{e}在哪个国家？", "要去{e}，应该前往哪个国家？"),
              statements=("{e}位于{v}。", "{e}是{v}的一座城市。", "要去{e}，就要前往{v}。"),
              explanation="{e}是{v}的城市。", values=countries,
              facts=_assign([name + "城" for name in names[n:2 * n]], countries, rng)),
        Topic("ceval", "middle_school_biology",
              exam="{e}主要吃什么？", drills=("{e}吃什么？", "{e}最爱吃的食物是什么？"),
              statements=("{e}吃{v}。", "{e}最爱吃的食物是{v}。", "{e}每天都要找{v}吃。"),
              explanation="{e}以{v}为食。", values=foods,
              facts=_assign([name + "兽" for name in names[2 * n:3 * n]], foods, rng)),
    ]


def _invented_names(rng: random.Random, n: int) -> list[str]:
    pool = [a + b for a in _FIRST for b in _SECOND]
    if n > len(pool):
        raise ValueError(f"asked for {n} invented names; the syllable lists make {len(pool)}")
    return rng.sample(pool, n)


def _assign(entities: list[str], values: tuple[str, ...], rng: random.Random) -> tuple[tuple[str, str], ...]:
    """Each value used equally often (len(entities) is a multiple of 4), in random order."""
    cycle = [values[i % len(values)] for i in range(len(entities))]
    rng.shuffle(cycle)
    return tuple(zip(entities, cycle))


def _balanced(facts: list[tuple[str, str]], values: tuple[str, ...], n: int,
              rng: random.Random) -> tuple[tuple[str, str], ...]:
    """``n`` facts, ``n / 4`` per value, in random order."""
    per_value = n // len(values)
    chosen = []
    for v in values:
        candidates = [f for f in facts if f[1] == v]
        if len(candidates) < per_value:
            raise ValueError(f"only {len(candidates)} facts with answer {v}; ask for at most "
                             f"{len(values) * len(candidates)} facts per topic")
        chosen += rng.sample(candidates, per_value)
    rng.shuffle(chosen)
    return tuple(chosen)


def practice_questions(topics: list[Topic]) -> list[Question]:
    """Every fact in every practice phrasing of its topic."""
    return [Question(t, d, e, v) for t in topics for e, v in t.facts for d in t.drills]


def exam_questions(topics: list[Topic]) -> list[Question]:
    """Every fact once, in the exam's phrasing."""
    return [Question(t, t.exam, e, v) for t in topics for e, v in t.facts]


def corpus_documents(topics: list[Topic], size: DemoSize, rng: random.Random) -> list[str]:
    """Documents of a few sentences each; every fact is stated ``corpus_mentions`` times, in the topic's
    statement templates and as a practice question followed by its answer."""
    sentences = []
    for t in topics:
        for e, v in t.facts:
            forms = [s.format(e=e, v=v) for s in t.statements]
            forms += [d.format(e=e) + t.statements[0].format(e=e, v=v) for d in t.drills]
            sentences += [forms[k % len(forms)] for k in range(size.corpus_mentions)]
    rng.shuffle(sentences)
    n = size.facts_per_document
    return ["".join(sentences[i:i + n]) for i in range(0, len(sentences), n)]


def lexicon(topics: list[Topic], extra: list[str] = ()) -> list[str]:
    """The words of the demo, one per line, for training its tokenizer.

    A BPE trained on the demo's own, very repetitive sentences would learn whole phrases as single tokens
    ("...是白色的"), so a fact and a question about it would share no tokens. Trained on the words instead, the
    tokens are characters and short words, as with a tokenizer trained on a large corpus.
    """
    words: set[str] = set(extra)
    for t in topics:
        for template in (t.exam, t.explanation) + t.drills + t.statements:
            words.update(w for w in re.split(r"\{[ev]\}", template) if w)
        for entity, value in t.facts:
            words.update((entity, value))
        words.update(t.values)
    words.update(FALLBACK_DESCRIPTION.split() + ["答案：", "\n".join(LETTERS)])
    words.update(str(n) for n in range(200))
    chars = {c for w in words for c in w if not _is_punctuation(c)}
    # Punctuation between characters, as in sentences: the pre-tokenizer then keeps each mark on its own.
    marks = "".join(sorted({c for w in words for c in w if _is_punctuation(c)}))
    return sorted(chars) + sorted(w for w in words if not all(map(_is_punctuation, w))) + ["的".join(marks) + "的"]


def _is_punctuation(c: str) -> bool:
    return not (c.isalnum() or c.isspace())


def cmmlu_csv(questions: list[Question]) -> str:
    """CMMLU's layout: an unnamed index column, then Question, A-D, Answer."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["", "Question", *LETTERS, "Answer"])
    for i, q in enumerate(questions):
        writer.writerow([i, q.text, *q.topic.values, q.answer])
    return buf.getvalue()


def ceval_csv(questions: list[Question]) -> str:
    """C-Eval's layout: id, question, A-D, answer, explanation."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["id", "question", *LETTERS, "answer", "explanation"])
    for i, q in enumerate(questions):
        writer.writerow([i, q.text, *q.topic.values, q.answer, q.topic.explanation.format(e=q.entity, v=q.value)])
    return buf.getvalue()


def generate(out_dir: str | Path, size: DemoSize = FULL, seed: int = 0,
             descriptions: dict[str, str] | None = None) -> DemoData:
    """Write corpus.jsonl, sft.json, lexicon.txt and eval/{cmmlu,ceval}/... under ``out_dir``.

    Deterministic in ``seed``. ``descriptions`` maps a task name (``cmmlu_<subject>``) to the instruction
    lm-eval's task puts before each question; the instruction samples use it as their system prompt, where
    lm-eval puts it when it applies a chat template.
    """
    out = Path(out_dir)
    rng = random.Random(seed)
    topics = build_topics(size, rng)
    practice, exam = practice_questions(topics), exam_questions(topics)
    rng.shuffle(practice)
    descriptions = descriptions or {}

    documents = corpus_documents(topics, size, rng)
    corpus = out / "corpus.jsonl"
    atomic_write_text(corpus, "".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in documents))

    records = [{"system": descriptions.get(q.topic.task, FALLBACK_DESCRIPTION), "instruction": q.prompt(),
                "input": "", "output": q.answer} for q in practice]
    sft = out / "sft.json"
    atomic_write_text(sft, json.dumps(records, ensure_ascii=False, indent=1) + "\n")

    words = lexicon(topics, [w for d in descriptions.values() for w in d.split()])
    lexicon_path = out / "lexicon.txt"
    atomic_write_text(lexicon_path, "\n".join(words) + "\n")

    eval_dir = out / "eval"
    for topic in topics:
        questions = [q for q in exam if q.topic is topic]
        dev = [q for q in practice if q.topic is topic][:size.dev_questions]
        if topic.benchmark == "cmmlu":
            atomic_write_text(eval_dir / "cmmlu" / "test" / f"{topic.subject}.csv", cmmlu_csv(questions))
            atomic_write_text(eval_dir / "cmmlu" / "dev" / f"{topic.subject}.csv", cmmlu_csv(dev))
        else:
            atomic_write_text(eval_dir / "ceval" / "val" / f"{topic.subject}_val.csv", ceval_csv(questions))
            atomic_write_text(eval_dir / "ceval" / "dev" / f"{topic.subject}_dev.csv", ceval_csv(dev))
    return DemoData(corpus=corpus, sft=sft, lexicon=lexicon_path, eval_dir=eval_dir, topics=topics, exam=exam,
                    practice=practice, corpus_documents=len(documents))
