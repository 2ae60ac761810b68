"""Deterministic demo datasets, written in the Parquet layouts of docs/ARCHITECTURE.md.

- image: 28x28 grayscale digits 0-9 drawn with Pillow's bundled font under random affine transforms,
  stroke widths and noise; ``image`` is a ``{bytes: PNG, path}`` struct, ``label`` an int.
- text: short documents in 4 topics, drawn from topic words, words shared between neighbouring topics and
  common English, with 3% label noise, so accuracy is learnable but not trivially 100%; ``label`` a string.

Splits: train / val / test / score (score has no label column). Every row has an ``id``.
"""

from __future__ import annotations

import io
import math
import multiprocessing
import os
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw, ImageFont

DEMO_VERSION = 2  # 2: splits over CHUNK_ROWS rows are made in chunks, each from its own seed
SPLIT_FRACTIONS = {"train": 1.0, "val": 1 / 6, "test": 1 / 6, "score": 1 / 3}
FILES_PER_SPLIT = 2
CHUNK_ROWS = 10_000

TOPICS: dict[str, str] = {
    "sports": "match goal coach league season striker keeper tournament referee stadium fans score "
    "championship playoff injury transfer squad midfield defender penalty victory defeat trophy "
    "athlete sprint marathon medal olympic record training",
    "business": "market shares profit revenue quarter investor merger acquisition stock earnings "
    "startup funding valuation ceo board dividend inflation bank loan interest rates retail "
    "supply demand customers sales forecast budget",
    "science": "researchers study experiment physics chemistry molecule particle telescope galaxy "
    "planet climate species evolution genome laboratory hypothesis data theory quantum energy "
    "fossil satellite orbit discovery journal peer",
    "health": "patients doctor hospital treatment vaccine disease symptoms clinic nurse diet "
    "exercise sleep therapy diagnosis virus infection blood pressure heart cancer surgery "
    "medicine dose trial recovery mental wellbeing",
}
# Words that genuinely belong to two topics: the overlap that keeps accuracy below 100%.
SHARED: dict[tuple[str, str], str] = {
    ("sports", "business"): "team contract deal sponsor million club owner growth",
    ("business", "science"): "technology innovation patent company investment analysis",
    ("science", "health"): "research clinical results scientists evidence trial cells brain",
    ("health", "sports"): "fitness muscle injury recovery performance diet",
}
COMMON = [
    "the",
    "a",
    "of",
    "and",
    "to",
    "in",
    "is",
    "was",
    "for",
    "on",
    "that",
    "with",
    "as",
    "it",
    "at",
    "by",
    "from",
    "this",
    "be",
    "are",
    "have",
    "has",
    "said",
    "new",
    "year",
    "after",
    "more",
    "about",
    "its",
    "last",
    "two",
    "first",
    "over",
    "than",
    "they",
    "which",
    "will",
    "also",
    "people",
    "time",
    "week",
    "report",
    "could",
    "would",
    "their",
    "been",
    "some",
    "most",
    "into",
    "while",
    "many",
    "other",
    "just",
    "under",
    "since",
    "when",
]


def _digit_templates(size: int = 56) -> list[np.ndarray]:
    font = ImageFont.load_default(size=int(size * 0.8))
    templates = []
    for digit in range(10):
        img = Image.new("L", (size, size), 0)
        draw = ImageDraw.Draw(img)
        draw.text((size / 2, size / 2), str(digit), fill=255, font=font, anchor="mm")
        templates.append(img)
    return templates


def render_digit(template: Image.Image, rng: np.random.Generator, out: int = 28) -> np.ndarray:
    """One 28x28 uint8 digit: random rotation, scale, shear, shift, stroke blur and noise."""
    size = template.size[0]
    angle = math.radians(rng.uniform(-15, 15))
    scale = rng.uniform(0.85, 1.15) * out / size
    shear = rng.uniform(-0.2, 0.2)
    shift = rng.uniform(-2.5, 2.5, size=2)
    # Inverse affine map from output pixel to template pixel, about the centres.
    cos, sin = math.cos(angle) / scale, math.sin(angle) / scale
    a, b, d, e = cos, -sin + shear / scale, sin, cos
    cx, cy = out / 2 + shift[0], out / 2 + shift[1]
    c = size / 2 - a * cx - b * cy
    f = size / 2 - d * cx - e * cy
    img = template.transform((out, out), Image.AFFINE, (a, b, c, d, e, f), resample=Image.BILINEAR)
    pixels = np.asarray(img, dtype=np.float32) * rng.uniform(0.6, 1.0)
    pixels += rng.normal(0, 25, size=pixels.shape)
    return np.clip(pixels, 0, 255).astype(np.uint8)


def _png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def make_image_table(
    n: int, seed: int | Sequence[int], with_labels: bool = True, prefix: str = "img", start: int = 0
) -> pa.Table:
    """``n`` digit rows drawn from ``seed``; ids (and paths) number them from ``start``."""
    rng = np.random.default_rng(seed)
    templates = _digit_templates()
    labels = rng.integers(0, 10, size=n)
    images = [
        {"bytes": _png(render_digit(templates[y], rng)), "path": f"{prefix}-{i:07d}.png"}
        for i, y in enumerate(labels, start=start)
    ]
    cols = {
        "id": pa.array([f"{prefix}-{i:07d}" for i in range(start, start + n)]),
        "image": pa.array(images, pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
    }
    if with_labels:
        cols["label"] = pa.array(labels, pa.int64())
    return pa.table(cols)


def make_text_table(
    n: int, seed: int | Sequence[int], with_labels: bool = True, prefix: str = "doc", start: int = 0
) -> pa.Table:
    """``n`` document rows drawn from ``seed``; ids number them from ``start``."""
    rng = np.random.default_rng(seed)
    topics = list(TOPICS)
    own = {t: TOPICS[t].split() for t in topics}
    shared = {t: [w for pair, words in SHARED.items() if t in pair for w in words.split()] for t in topics}
    labels = rng.integers(0, len(topics), size=n)
    common = np.array(COMMON)
    docs = []
    for y in labels:
        pools = (np.array(own[topics[y]]), np.array(shared[topics[y]]), common)
        length = int(rng.integers(6, 30))
        source = rng.choice(3, size=length, p=[0.22, 0.18, 0.60])
        picks = rng.random(length)
        words = [pools[s][int(r * len(pools[s]))] for s, r in zip(source, picks, strict=True)]
        text = " ".join(words)
        docs.append(text[0].upper() + text[1:] + ".")
    return _text_table(docs, labels, topics, rng, with_labels, prefix, start)


def _text_table(
    docs: list[str], labels: np.ndarray, topics: list[str], rng, with_labels: bool, prefix: str, start: int
) -> pa.Table:
    """The demo's text rows: 3% of the labels replaced by random ones (label noise), ids from ``start``."""
    n = len(docs)
    noisy = rng.random(n) < 0.03
    labels = np.where(noisy, rng.integers(0, len(topics), size=n), labels)
    cols = {"id": pa.array([f"{prefix}-{i:07d}" for i in range(start, start + n)]), "text": pa.array(docs)}
    if with_labels:
        cols["label"] = pa.array([topics[y] for y in labels])
    return pa.table(cols)


# Headlines written as Chinese is: words of one to three characters with no spaces between them, so a
# tokenizer that splits on spaces and punctuation sees each headline (or clause) as one unseen "word".
ZH_TOPICS: dict[str, str] = {
    "体育": "比赛 进球 教练 联赛 赛季 前锋 门将 冠军 球迷 主场 客场 决赛 点球 奥运 金牌 田径 马拉松 "
    "球队 转会 裁判 世界杯 篮球 足球 网球 选手",
    "财经": "市场 股价 利润 营收 季度 投资者 并购 股票 收益 融资 估值 银行 贷款 利率 通胀 零售 供应 "
    "需求 销售 预算 债券 汇率 基金 上市 央行",
    "科技": "研究 实验 物理 化学 分子 粒子 望远镜 星系 行星 芯片 算法 人工智能 量子 卫星 轨道 发现 "
    "论文 软件 机器人 数据 网络 手机 电池 火箭 基因",
    "健康": "患者 医生 医院 治疗 疫苗 疾病 症状 诊所 护士 饮食 锻炼 睡眠 疗法 诊断 病毒 感染 血压 "
    "心脏 癌症 手术 药物 剂量 康复 心理 营养",
}
ZH_SHARED: dict[tuple[str, str], str] = {
    ("体育", "财经"): "赞助 合同 俱乐部 老板 增长 百万",
    ("财经", "科技"): "技术 创新 专利 公司 投资 分析",
    ("科技", "健康"): "临床 结果 科学家 证据 细胞 大脑",
    ("健康", "体育"): "健身 肌肉 受伤 恢复 表现 体能",
}
ZH_COMMON = "的 了 在 是 和 与 对 将 新 年 后 今日 发布 宣布 报道 表示 称 本周 首次 最新 全国 国际 我国 "
ZH_COMMON += "多地 专家 关注 持续 迎来 再次 进一步 重要 继续"


def make_chinese_text_table(
    n: int, seed: int | Sequence[int], with_labels: bool = True, prefix: str = "zh", start: int = 0
) -> pa.Table:
    """``n`` Chinese headline rows (four topics, string labels) drawn from ``seed``, no spaces between
    words; ids number them from ``start``."""
    rng = np.random.default_rng(seed)
    topics = list(ZH_TOPICS)
    own = {t: np.array(ZH_TOPICS[t].split()) for t in topics}
    shared = {
        t: np.array([w for pair, ws in ZH_SHARED.items() if t in pair for w in ws.split()]) for t in topics
    }
    common = np.array(ZH_COMMON.split())
    labels = rng.integers(0, len(topics), size=n)
    docs = []
    for y in labels:
        pools = (own[topics[y]], shared[topics[y]], common)
        length = int(rng.integers(4, 12))
        source = rng.choice(3, size=length, p=[0.30, 0.20, 0.50])
        words = [pools[k][int(rng.integers(len(pools[k])))] for k in source]
        cut = int(rng.integers(2, length)) if length > 5 else length  # a clause break in longer headlines
        docs.append("".join(words[:cut]) + ("，" + "".join(words[cut:]) if cut < length else ""))
    return _text_table(docs, labels, topics, rng, with_labels, prefix, start)


def make_rows(
    task: str, n: int, seed: int, with_labels: bool, prefix: str, processes: int | None = None
) -> pa.Table:
    """``n`` demo rows in chunks of CHUNK_ROWS, chunk c drawn from the seed ``[seed, c]`` (chunk 0's is
    ``seed`` itself, so a split of at most CHUNK_ROWS rows is ``make_*_table(n, seed)``). The rows do not
    depend on how many processes made them; a split of several chunks is made in up to ``processes`` (default:
    this process's CPUs) new processes, so a large demo is made at the machine's speed (docs/PERFORMANCE.md)."""
    make = make_image_table if task == "image" else make_text_table
    starts = list(range(0, n, CHUNK_ROWS))
    chunks = [
        (min(CHUNK_ROWS, n - s), [seed, c] if c else seed, with_labels, prefix, s)
        for c, s in enumerate(starts)
    ]
    # The CPUs this process may run on where the OS says (Linux), else the machine's (macOS has no affinity).
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    processes = min(len(chunks), processes or cpus)
    if processes == 1:
        return pa.concat_tables([make(*chunk) for chunk in chunks])
    # spawn: the caller may be a Ray driver with threads running, which a fork would copy mid-flight.
    with ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pa.concat_tables(pool.map(make, *zip(*chunks, strict=True)))


def write_demo_data(root: str | Path, task: str, train_rows: int, seed: int = 0) -> dict[str, str]:
    """Write the demo splits for ``task`` under ``root`` (once; reused after) and return split -> dir."""
    base = Path(root) / f"v{DEMO_VERSION}-n{train_rows}-s{seed}" / task
    paths = {split: str(base / split) for split in SPLIT_FRACTIONS}
    if (base / "_SUCCESS").exists():
        return paths
    for k, (split, frac) in enumerate(SPLIT_FRACTIONS.items()):
        n = max(20, int(train_rows * frac))
        table = make_rows(task, n, seed * 100 + k, with_labels=split != "score", prefix=f"{task}-{split}")
        out = base / split
        out.mkdir(parents=True, exist_ok=True)
        bounds = np.linspace(0, n, FILES_PER_SPLIT + 1).astype(int)
        for j in range(FILES_PER_SPLIT):
            part = table.slice(bounds[j], bounds[j + 1] - bounds[j])
            pq.write_table(part, out / f"part-{j:04d}.parquet", row_group_size=1000)
    (base / "_SUCCESS").write_text("")
    return paths
