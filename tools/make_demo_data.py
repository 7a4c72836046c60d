"""Write a demo AdvertiseGen set whose summary is a learnable function of the keywords (or, with --kind tools, a
ChatGLM3 tool-use set: see tools/tool_use_data.py).

    python tools/make_demo_data.py --output_dir build/data/AdvertiseGen
    python tools/make_demo_data.py --output_dir DIR --num_train 5000 --num_dev 200 --seed 1
    python tools/make_demo_data.py --output_dir build/data/tools --kind tools

Each record looks like the real AdvertiseGen (`content` = "类型#上衣*材质#牛仔布*…", `summary` = ad copy), but
every summary is assembled from one fixed phrase per keyword value, in a fixed attribute order. A model that
learns the mapping scores visibly higher ROUGE/BLEU than an untrained one, which is what the demo shows.
"""
import argparse
import json
import random
import sys
from pathlib import Path

from glm_tune.errors import run_cli
from glm_tune.safe_output import atomic_write_text, check_output_dir, write_owner
from tools.tool_use_data import prompt_of, tool_record

COMMAND = "make_demo_data"

# Garment type -> (its style attribute name, style values). Mirrors AdvertiseGen's 衣样式/裙型/裤型 keys.
STYLE_KEYS = {
    "上衣": ("衣样式", ["衬衫", "外套", "卫衣", "T恤", "毛衣"]),
    "裙": ("裙型", ["A字裙", "百褶裙", "包臀裙", "连衣裙"]),
    "裤": ("裤型", ["阔腿裤", "直筒裤", "哈伦裤", "牛仔裤"]),
}

# Attribute -> value -> the phrase the summary uses for it. Order of this dict is the summary's order.
PHRASES = {
    "材质": {
        "牛仔布": "牛仔布面料耐磨挺括",
        "棉": "纯棉面料柔软透气",
        "雪纺": "雪纺材质轻盈飘逸",
        "针织": "针织工艺贴身舒适",
        "真丝": "真丝质地顺滑亲肤",
        "羊毛": "羊毛材质保暖有型",
    },
    "颜色": {
        "白色": "白色调清爽干净",
        "黑色": "黑色显瘦又经典",
        "红色": "红色热情提气色",
        "蓝色": "蓝色沉静又文艺",
        "粉色": "粉色温柔很减龄",
        "灰色": "灰色低调有质感",
    },
    "风格": {
        "简约": "简约设计百搭好穿",
        "复古": "复古韵味十足",
        "休闲": "休闲随性不拘束",
        "通勤": "通勤干练显气场",
        "街头": "街头范儿很酷",
        "甜美": "甜美可爱有少女感",
    },
    "图案": {
        "刺绣": "精致刺绣点缀细节",
        "条纹": "条纹元素拉长比例",
        "格子": "格子图案经典耐看",
        "印花": "印花图案活泼灵动",
        "纯色": "纯色款式更显高级",
        "字母": "字母装饰个性时髦",
    },
    "领型": {
        "圆领": "圆领修饰脸型",
        "v领": "v领露出锁骨",
        "翻领": "翻领干净利落",
        "高领": "高领温暖优雅",
    },
}


def make_record(rng: random.Random) -> dict:
    """One AdvertiseGen-shaped record: shuffled keywords in `content`, deterministic ad copy in `summary`."""
    garment = rng.choice(sorted(STYLE_KEYS))
    style_key, style_values = STYLE_KEYS[garment]
    style = rng.choice(style_values)
    # Trousers have no collar: 领型 only describes tops and dresses, as in the real data.
    pool = [a for a in sorted(PHRASES) if not (a == "领型" and garment == "裤")]
    attrs = rng.sample(pool, k=rng.randint(2, 4))
    values = {a: rng.choice(sorted(PHRASES[a])) for a in attrs}
    keywords = [("类型", garment), (style_key, style)] + [(a, values[a]) for a in attrs]
    rng.shuffle(keywords)
    content = "*".join(f"{k}#{v}" for k, v in keywords)
    phrases = [PHRASES[a][values[a]] for a in PHRASES if a in values]
    summary = f"这款{style}" + "，".join(phrases) + "。"
    return {"content": content, "summary": summary}


KINDS = {"adgen": (make_record, lambda record: record["content"]), "tools": (tool_record, prompt_of)}


def make_split(num: int, rng: random.Random, taken: set, kind: str = "adgen", dev: bool = False,
               unique: bool = True) -> list:
    """`num` records whose prompt is not in `taken` (so dev never repeats a train prompt); with `unique`, each
    prompt once. Records without such a prompt (small talk) go to train only."""
    make, prompt = KINDS[kind]
    records = []
    while len(records) < num:
        record = make(rng)
        key = prompt(record)
        if key is None and not dev:
            records.append(record)
        elif key is not None and key not in taken:
            if unique:
                taken.add(key)
            records.append(record)
    return records


def write_jsonl(records: list, path: Path) -> None:
    atomic_write_text(path, "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records))


def make_demo_data(output_dir, num_train: int = 2000, num_dev: int = 100, seed: int = 42,
                   overwrite: bool = False, kind: str = "adgen") -> Path:
    """Write `train.json` and `dev.json` (JSON lines) into `output_dir`; deterministic given `seed`. A folder
    this command did not make is refused unless `overwrite` (and then only those two files are replaced)."""
    output_dir = check_output_dir(output_dir, COMMAND, overwrite=overwrite)
    output_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    taken = set()
    if kind == "tools":  # few distinct prompts per template: dev takes its prompts first, train repeats the rest
        dev = make_split(num_dev, rng, taken, kind, dev=True)
        train = make_split(num_train, rng, taken, kind, unique=False)
    else:
        train = make_split(num_train, rng, taken, kind)
        dev = make_split(num_dev, rng, taken, kind, dev=True)
    write_jsonl(train, output_dir / "train.json")
    write_jsonl(dev, output_dir / "dev.json")
    write_owner(output_dir, COMMAND)
    return output_dir


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", required=True, help="folder that receives train.json and dev.json")
    parser.add_argument("--num_train", type=int, default=2000, help="number of training records")
    parser.add_argument("--num_dev", type=int, default=100, help="number of dev records (prompts unseen in train)")
    parser.add_argument("--seed", type=int, default=42, help="random seed; same seed, same files")
    parser.add_argument("--kind", default="adgen", choices=sorted(KINDS),
                        help="adgen: AdvertiseGen-shaped ad copy; tools: ChatGLM3 tool-use conversations")
    parser.add_argument("--overwrite", action="store_true",
                        help="write train.json and dev.json into an existing folder this command did not make")
    args = parser.parse_args(argv)
    if args.num_train < 1 or args.num_dev < 1:
        parser.error("--num_train and --num_dev must be at least 1")
    out = make_demo_data(args.output_dir, args.num_train, args.num_dev, args.seed, args.overwrite, args.kind)
    print(f"wrote {args.num_train} train and {args.num_dev} dev records to {out}", file=sys.stderr)


if __name__ == "__main__":
    run_cli(main)
