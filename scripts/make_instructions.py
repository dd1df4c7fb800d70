"""Write tegaki's small bundled instruction set (English and Japanese) from templates.

    python scripts/make_instructions.py     # -> tegaki/finetune/instructions/{train,heldout}.jsonl

Every record is made here from the word lists and templates below, written for tegaki (no data set
is copied), so the set is dedicated to the public domain (CC0-1.0; see the folder's README.md).
The tasks are small on purpose -- a 2.6M-parameter model trained on Shakespeare can learn their
format in a few hundred steps: sums, colours, opposites, English <-> Japanese words, repeating a
line, counting, short multi-turn chats. The same seed writes the same files.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "tegaki" / "finetune" / "instructions"
SEED = 2024
HELDOUT_SHARE = 0.15

WORDS = [  # English, Japanese
    ("cat", "猫"),
    ("dog", "犬"),
    ("water", "水"),
    ("fire", "火"),
    ("mountain", "山"),
    ("river", "川"),
    ("tree", "木"),
    ("flower", "花"),
    ("sky", "空"),
    ("rain", "雨"),
    ("snow", "雪"),
    ("moon", "月"),
    ("sun", "太陽"),
    ("book", "本"),
    ("house", "家"),
    ("car", "車"),
    ("fish", "魚"),
    ("bird", "鳥"),
    ("friend", "友達"),
    ("school", "学校"),
    ("bread", "パン"),
    ("tea", "お茶"),
    ("sea", "海"),
    ("star", "星"),
]
COLOURS = [  # thing, colour (en), colour (ja), thing (ja)
    ("the sky", "blue", "青", "空"),
    ("grass", "green", "緑", "草"),
    ("snow", "white", "白", "雪"),
    ("a lemon", "yellow", "黄色", "レモン"),
    ("blood", "red", "赤", "血"),
    ("coal", "black", "黒", "石炭"),
    ("an orange", "orange", "オレンジ色", "オレンジ"),
    ("a banana", "yellow", "黄色", "バナナ"),
    ("milk", "white", "白", "牛乳"),
    ("a strawberry", "red", "赤", "いちご"),
]
OPPOSITES = [
    ("hot", "cold", "熱い", "冷たい"),
    ("big", "small", "大きい", "小さい"),
    ("fast", "slow", "速い", "遅い"),
    ("up", "down", "上", "下"),
    ("day", "night", "昼", "夜"),
    ("old", "new", "古い", "新しい"),
    ("long", "short", "長い", "短い"),
    ("high", "low", "高い", "低い"),
    ("light", "dark", "明るい", "暗い"),
    ("open", "closed", "開いている", "閉まっている"),
]
LINES = [
    "To be, or not to be.",
    "All the world's a stage.",
    "The rain falls on the hill.",
    "I like green tea.",
    "We walk by the river.",
    "The cat sleeps in the sun.",
    "花が咲いた。",
    "今日は雨です。",
    "猫が好きです。",
    "山に登りました。",
    "Good night, sweet prince.",
    "The moon is bright tonight.",
]


def alpaca(instruction: str, output: str, extra: str = "") -> dict:
    record = {"instruction": instruction, "input": extra, "output": output}
    return record


def chat(*turns: str, system: str | None = None) -> dict:
    messages = [{"role": "system", "content": system}] if system else []
    for i, text in enumerate(turns):
        messages.append({"role": "user" if i % 2 == 0 else "assistant", "content": text})
    return {"messages": messages}


def sums(rng: random.Random) -> list[dict]:
    out = []
    for _ in range(70):
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        if rng.random() < 0.5:
            out.append(alpaca(f"What is {a} plus {b}?", f"{a} + {b} = {a + b}."))
        else:
            out.append(alpaca(f"{a} たす {b} は？", f"{a} + {b} = {a + b} です。"))
    return out


def colours() -> list[dict]:
    out = []
    for thing, en, ja, thing_ja in COLOURS:
        out.append(alpaca(f"What colour is {thing}?", f"{thing[0].upper() + thing[1:]} is {en}."))
        out.append(alpaca(f"{thing_ja}は何色ですか？", f"{thing_ja}は{ja}です。"))
    return out


def opposites() -> list[dict]:
    out = []
    for en_a, en_b, ja_a, ja_b in OPPOSITES:
        for a, b, ja1, ja2 in ((en_a, en_b, ja_a, ja_b), (en_b, en_a, ja_b, ja_a)):
            out.append(alpaca(f'What is the opposite of "{a}"?', f'The opposite of "{a}" is "{b}".'))
            out.append(alpaca(f"「{ja1}」の反対は？", f"「{ja1}」の反対は「{ja2}」です。"))
    return out


def translations() -> list[dict]:
    out = []
    for en, ja in WORDS:
        out.append(alpaca("Translate this word into Japanese.", f"{en} -> {ja}", extra=en))
        out.append(alpaca("この言葉を英語にしてください。", f"{ja} -> {en}", extra=ja))
    return out


def repeats(rng: random.Random) -> list[dict]:
    out = []
    for line in LINES:
        times = rng.randint(2, 3)
        out.append(alpaca(f"Repeat this line {times} times.", "\n".join([line] * times), extra=line))
        out.append(alpaca("次の文をそのまま書いてください。", line, extra=line))
    return out


def counting(rng: random.Random) -> list[dict]:
    out = []
    for _ in range(30):
        n = rng.randint(2, 6)
        words = [rng.choice(WORDS)[0] for _ in range(n)]
        out.append(alpaca("How many words are in this list?", f"There are {n} words.", extra=", ".join(words)))
    return out


def chats(rng: random.Random) -> list[dict]:
    out = []
    for en, ja in WORDS:
        out.append(
            chat(f'What is "{en}" in Japanese?', f'"{en}" is {ja}.', "And in English again?", f'{ja} is "{en}".')
        )
        out.append(chat(f"「{ja}」は英語で？", f"「{ja}」は {en} です。", system="You answer in one short sentence."))
    for _ in range(20):
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        out.append(chat("Hello!", "Hello! How can I help?", f"What is {a} plus {b}?", f"{a} + {b} = {a + b}."))
    return out


def main() -> None:
    rng = random.Random(SEED)
    records = sums(rng) + colours() + opposites() + translations() + repeats(rng) + counting(rng) + chats(rng)
    unique = list({json.dumps(r, ensure_ascii=False, sort_keys=True): r for r in records}.values())
    rng.shuffle(unique)
    n_held = round(len(unique) * HELDOUT_SHARE)
    OUT.mkdir(parents=True, exist_ok=True)
    for name, part in (("heldout.jsonl", unique[:n_held]), ("train.jsonl", unique[n_held:])):
        lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in part)
        (OUT / name).write_text(lines, encoding="utf-8")
        print(f"{OUT / name}: {len(part)} records")


if __name__ == "__main__":
    main()
