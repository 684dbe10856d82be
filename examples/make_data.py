"""Write the sample data sets that ship with the repo; deterministic (seeded), so a rerun reproduces them byte for byte.

    python examples/make_data.py [--out DIR] [--seed N]

- arith_train.jsonl (570 records) and arith_eval.jsonl (60 records): arithmetic word problems in English and
  Chinese (addition, subtraction, multiplication of small numbers, and "pick" questions whose answer is one of two
  counts stated in the problem: reading, which the 270M learns quickly), alpaca shape, the answer just the number, so
  exact match scores them. No (operation, a, b) of the eval set appears in the training set.
- general_zh_en.jsonl: a few short general instructions in both languages, written by hand below, in the messages
  and sharegpt shapes (some with a system message, some multi-turn).
"""

import argparse
import json
import os
import random

TRAIN_PER_OP = {"add": 160, "sub": 160, "mul": 40, "pick": 210}  # 570 records
EVAL_PER_OP = {"add": 18, "sub": 18, "mul": 4, "pick": 20}  # 60 records

# Every (a, b) an operation may use: sums of numbers up to 20, differences below 25, the times table. Small
# enough that the 270M model learns the task in the few minutes the main job has on a laptop CPU.
PAIRS = {
    "add": [(a, b) for a in range(1, 21) for b in range(1, 21)],
    "sub": [(a, b) for a in range(2, 26) for b in range(1, a)],
    "mul": [(a, b) for a in range(2, 10) for b in range(2, 10)],
    "pick": [(a, b) for a in range(2, 60) for b in range(2, 60) if a != b],
}
# "pick" asks for one of two counts given in the problem: reading, not arithmetic, so a small model can learn it.
ANSWER = {"add": lambda a, b: a + b, "sub": lambda a, b: a - b, "mul": lambda a, b: a * b, "pick": lambda a, b: b}

EN_NAMES = ["Tom", "Anna", "Lily", "Ben", "Sam", "Mia", "Jack", "Emma"]
EN_ITEMS = ["apples", "books", "pencils", "candies", "stickers", "marbles", "oranges", "cards"]
EN_TEMPLATES = {
    "add": [
        "{name} has {a} {item} and buys {b} more. How many {item} does {name} have now?",
        "There are {a} {item} in a box. {name} puts in {b} more. How many {item} are in the box now?",
        "{name} had {a} {item}. A friend gave {name} {b} more. How many {item} does {name} have in total?",
        "What is {a} plus {b}?",
    ],
    "sub": [
        "{name} has {a} {item} and gives {b} to a friend. How many {item} does {name} have left?",
        "There are {a} {item} on the table. {name} takes away {b}. How many {item} are left on the table?",
        "{name} had {a} {item} and lost {b} of them. How many {item} does {name} have now?",
        "What is {a} minus {b}?",
    ],
    "mul": [
        "{name} buys {a} bags of {item}. Each bag has {b} {item}. How many {item} does {name} buy in total?",
        "There are {a} rows of {item} with {b} {item} in each row. How many {item} are there?",
        "{name} gives {b} {item} to each of {a} friends. How many {item} does {name} give away?",
        "What is {a} times {b}?",
    ],
    "pick": [
        "{name} has {a} {item} and {b} {item2}. How many {item2} does {name} have?",
        "In a box there are {a} {item} and {b} {item2}. How many {item2} are in the box?",
    ],
}
ZH_NAMES = ["小明", "小红", "小华", "小丽", "小刚", "小芳", "小军", "小雨"]
ZH_ITEMS = [("苹果", "个"), ("书", "本"), ("铅笔", "支"), ("糖", "颗"), ("贴纸", "张"), ("橘子", "个"), ("卡片", "张")]
ZH_TEMPLATES = {
    "add": [
        "{name}有{a}{unit}{item}，又买了{b}{unit}，现在一共有多少{unit}{item}？",
        "盒子里有{a}{unit}{item}，{name}又放进去{b}{unit}，盒子里现在有多少{unit}{item}？",
        "{name}原来有{a}{unit}{item}，朋友又送给{name}{b}{unit}，{name}一共有多少{unit}{item}？",
        "{a}加{b}等于多少？",
    ],
    "sub": [
        "{name}有{a}{unit}{item}，送给朋友{b}{unit}，还剩多少{unit}{item}？",
        "桌子上有{a}{unit}{item}，{name}拿走了{b}{unit}，桌子上还剩多少{unit}{item}？",
        "{name}有{a}{unit}{item}，弄丢了{b}{unit}，现在还有多少{unit}{item}？",
        "{a}减{b}等于多少？",
    ],
    "mul": [
        "{name}买了{a}袋{item}，每袋有{b}{unit}，一共买了多少{unit}{item}？",
        "桌上摆了{a}排{item}，每排{b}{unit}，一共有多少{unit}{item}？",
        "{name}给{a}个朋友每人{b}{unit}{item}，一共送出多少{unit}{item}？",
        "{a}乘以{b}等于多少？",
    ],
    "pick": [
        "{name}有{a}{unit}{item}和{b}{unit2}{item2}，{name}有多少{unit2}{item2}？",
        "盒子里有{a}{unit}{item}和{b}{unit2}{item2}，盒子里有多少{unit2}{item2}？",
    ],
}

# Hand-written general instructions: short answers, both languages, messages and sharegpt shapes mixed.
GENERAL = [
    {
        "messages": [
            {"role": "user", "content": "What is the capital of France?"},
            {"role": "assistant", "content": "Paris."},
        ]
    },
    {"messages": [{"role": "user", "content": "中国的首都是哪里？"}, {"role": "assistant", "content": "北京。"}]},
    {
        "conversations": [
            {"from": "human", "value": "Translate into Chinese: Good morning."},
            {"from": "gpt", "value": "早上好。"},
        ]
    },
    {
        "conversations": [
            {"from": "human", "value": "把这句话翻译成英文：我喜欢读书。"},
            {"from": "gpt", "value": "I like reading books."},
        ]
    },
    {
        "messages": [
            {"role": "system", "content": "Answer in one word."},
            {"role": "user", "content": "What color is the sky on a clear day?"},
            {"role": "assistant", "content": "Blue."},
        ]
    },
    {
        "messages": [
            {"role": "system", "content": "请用一句话回答。"},
            {"role": "user", "content": "太阳从哪个方向升起？"},
            {"role": "assistant", "content": "太阳从东方升起。"},
        ]
    },
    {
        "conversations": [
            {"from": "human", "value": 'Give me a synonym for "happy".'},
            {"from": "gpt", "value": "Joyful."},
        ]
    },
    {"conversations": [{"from": "human", "value": "“高兴”的反义词是什么？"}, {"from": "gpt", "value": "难过。"}]},
    {
        "messages": [
            {"role": "user", "content": "How many days are in a week?"},
            {"role": "assistant", "content": "Seven."},
        ]
    },
    {"messages": [{"role": "user", "content": "一年有几个月？"}, {"role": "assistant", "content": "一年有十二个月。"}]},
    {
        "conversations": [
            {"from": "human", "value": "Does ice float on water? Answer yes or no."},
            {"from": "gpt", "value": "Yes."},
        ]
    },
    {"conversations": [{"from": "human", "value": "水在多少摄氏度结冰？"}, {"from": "gpt", "value": "0摄氏度。"}]},
    {
        "messages": [
            {"role": "user", "content": "Write a Python expression that adds 2 and 3."},
            {"role": "assistant", "content": "2 + 3"},
        ]
    },
    {
        "messages": [
            {"role": "user", "content": "用Python打印“你好”。"},
            {"role": "assistant", "content": 'print("你好")'},
        ]
    },
    {
        "conversations": [
            {"from": "system", "value": "You are a friendly assistant."},
            {"from": "human", "value": "Hello!"},
            {"from": "gpt", "value": "Hello! How can I help you today?"},
        ]
    },
    {
        "conversations": [
            {"from": "system", "value": "你是一个友好的助手。"},
            {"from": "human", "value": "你好！"},
            {"from": "gpt", "value": "你好！有什么可以帮你的吗？"},
        ]
    },
    {
        "messages": [
            {"role": "user", "content": "Name a fruit that is yellow."},
            {"role": "assistant", "content": "A banana."},
        ]
    },
    {"messages": [{"role": "user", "content": "说出一种红色的水果。"}, {"role": "assistant", "content": "苹果。"}]},
    {
        "conversations": [
            {"from": "human", "value": 'What is the opposite of "cold"?'},
            {"from": "gpt", "value": "Hot."},
        ]
    },
    {"conversations": [{"from": "human", "value": "“大”的反义词是什么？"}, {"from": "gpt", "value": "小。"}]},
    {
        "messages": [
            {"role": "user", "content": "Which planet do we live on?"},
            {"role": "assistant", "content": "Earth."},
        ]
    },
    {
        "messages": [
            {"role": "user", "content": "地球上最大的海洋是什么？"},
            {"role": "assistant", "content": "太平洋。"},
        ]
    },
    {"conversations": [{"from": "human", "value": 'Spell the word "cat" backwards.'}, {"from": "gpt", "value": "tac"}]},
    {
        "conversations": [
            {"from": "human", "value": "“春眠不觉晓”的下一句是什么？"},
            {"from": "gpt", "value": "处处闻啼鸟。"},
        ]
    },
    {
        "messages": [
            {"role": "user", "content": "Summarize in three words: The cat slept all day in the sun."},
            {"role": "assistant", "content": "Cat sunbathed lazily."},
        ]
    },
    {"messages": [{"role": "user", "content": "用四个字形容春天。"}, {"role": "assistant", "content": "春暖花开。"}]},
    {
        "conversations": [
            {"from": "human", "value": "How many legs does a spider have?"},
            {"from": "gpt", "value": "Eight."},
        ]
    },
    {"conversations": [{"from": "human", "value": "熊猫主要吃什么？"}, {"from": "gpt", "value": "竹子。"}]},
    {
        "messages": [
            {"role": "user", "content": "Is 17 a prime number?"},
            {"role": "assistant", "content": "Yes, 17 is prime."},
        ]
    },
    {"messages": [{"role": "user", "content": "10是奇数还是偶数？"}, {"role": "assistant", "content": "偶数。"}]},
    {
        "conversations": [
            {"from": "human", "value": "Put these in alphabetical order: pear, apple, mango."},
            {"from": "gpt", "value": "apple, mango, pear"},
        ]
    },
    {"conversations": [{"from": "human", "value": "请把“hello”翻译成中文。"}, {"from": "gpt", "value": "你好。"}]},
    {"messages": [{"role": "user", "content": "What do bees make?"}, {"role": "assistant", "content": "Honey."}]},
    {"messages": [{"role": "user", "content": "彩虹有几种颜色？"}, {"role": "assistant", "content": "七种。"}]},
    # Multi-turn.
    {
        "messages": [
            {"role": "user", "content": "My name is Anna."},
            {"role": "assistant", "content": "Nice to meet you, Anna!"},
            {"role": "user", "content": "What is my name?"},
            {"role": "assistant", "content": "Your name is Anna."},
        ]
    },
    {
        "messages": [
            {"role": "user", "content": "我叫小明。"},
            {"role": "assistant", "content": "你好，小明！"},
            {"role": "user", "content": "我叫什么名字？"},
            {"role": "assistant", "content": "你叫小明。"},
        ]
    },
    {
        "conversations": [
            {"from": "human", "value": "Think of a number: 5."},
            {"from": "gpt", "value": "OK, 5."},
            {"from": "human", "value": "Double it."},
            {"from": "gpt", "value": "10."},
            {"from": "human", "value": "Now add 1."},
            {"from": "gpt", "value": "11."},
        ]
    },
    {
        "conversations": [
            {"from": "system", "value": "用中文回答。"},
            {"from": "human", "value": "What is the largest animal?"},
            {"from": "gpt", "value": "蓝鲸。"},
            {"from": "human", "value": "它生活在哪里？"},
            {"from": "gpt", "value": "海洋里。"},
        ]
    },
    {
        "messages": [
            {"role": "system", "content": "Reply in English."},
            {"role": "user", "content": "一加一等于几？"},
            {"role": "assistant", "content": "Two."},
            {"role": "user", "content": "二加二呢？"},
            {"role": "assistant", "content": "Four."},
        ]
    },
    {
        "conversations": [
            {"from": "human", "value": "Say hi in Chinese."},
            {"from": "gpt", "value": "你好。"},
            {"from": "human", "value": "And in English?"},
            {"from": "gpt", "value": "Hi."},
        ]
    },
]


def problem(rng: random.Random, op: str, a: int, b: int) -> dict:
    """One alpaca record: a word problem for `a op b` in a random language and template, the number as the answer."""
    if rng.random() < 0.5:
        item, item2 = rng.sample(EN_ITEMS, 2)
        text = rng.choice(EN_TEMPLATES[op]).format(name=rng.choice(EN_NAMES), item=item, item2=item2, a=a, b=b)
    else:
        (item, unit), (item2, unit2) = rng.sample(ZH_ITEMS, 2)
        text = rng.choice(ZH_TEMPLATES[op]).format(
            name=rng.choice(ZH_NAMES), item=item, unit=unit, item2=item2, unit2=unit2, a=a, b=b
        )
    return {"instruction": text, "output": str(ANSWER[op](a, b))}


def arithmetic(seed: int) -> tuple[list[dict], list[dict]]:
    """(train, eval) records; each (op, a, b) is used at most once, so the eval problems are held out."""
    rng = random.Random(seed)
    train, held_out = [], []
    for op in ("add", "sub", "mul", "pick"):
        pairs = rng.sample(PAIRS[op], EVAL_PER_OP[op] + TRAIN_PER_OP[op])
        held_out += [problem(rng, op, a, b) for a, b in pairs[: EVAL_PER_OP[op]]]
        train += [problem(rng, op, a, b) for a, b in pairs[EVAL_PER_OP[op] :]]
    rng.shuffle(train)
    rng.shuffle(held_out)
    return train, held_out


def write_jsonl(path: str, records: list[dict]):
    """UTF-8 JSONL, written to a temporary name and renamed into place."""
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8", newline="\n") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.dirname(os.path.abspath(__file__)), help="folder to write into")
    parser.add_argument("--seed", type=int, default=0, help="seed of the arithmetic sets")
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    train, held_out = arithmetic(args.seed)
    for name, records in (
        ("arith_train.jsonl", train),
        ("arith_eval.jsonl", held_out),
        ("general_zh_en.jsonl", GENERAL),
    ):
        write_jsonl(os.path.join(args.out, name), records)
        print(f"{os.path.join(args.out, name)}: {len(records)} records")


if __name__ == "__main__":
    main()
