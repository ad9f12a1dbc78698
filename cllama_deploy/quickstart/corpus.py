"""Deterministic synthetic text: the embedded default corpus and the test suite's fixture text.

Real Chinese corpora are not shipped (and nothing may be downloaded at run time), so the quickstart
and the tests generate text with the statistics that matter here: frequent multi-character Chinese
words (which a Chinese SentencePiece model learns as pieces), Chinese punctuation, English words,
digits and the odd emoji.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Callable, Sequence

ZH_WORDS = (
    "我们 你们 他们 今天 明天 昨天 时间 中国 北京 上海 学习 工作 生活 朋友 老师 学生 学校 大学 "
    "语言 模型 中文 词表 训练 数据 计算 机器 人工 智能 问题 回答 知识 世界 城市 天气 春天 夏天 "
    "秋天 冬天 山水 月亮 太阳 星星 花园 音乐 电影 书籍 文章 故事 历史 文化 科学 技术 经济 社会 "
    "发展 研究 方法 系统 软件 硬件 网络 服务 用户 程序 代码 文件 目录 命令 安装 配置 运行 测试 "
    "因为 所以 但是 如果 虽然 然后 已经 可以 应该 需要 希望 喜欢 认为 知道 觉得 开始 结束 继续 "
    "一个 这个 那个 什么 怎么 为什么 非常 特别 一起 自己 大家 现在 以后 以前 一直 还是 或者 "
    "吃饭 喝茶 睡觉 跑步 旅行 读书 写字 唱歌 跳舞 画画 电脑 手机 汽车 火车 飞机 医院 银行 公司"
).split()
ZH_CHARS = "的一是了不在有人这中大为上个国我以要他时来用们生到作地于出就分对成会可主发年动同工也能下过子说产种面而方后多定行学法所民得经十三之进着等部度家电力里如水化高自二理起小物现实加量都两体制机当使点从业本去把性好应开它合还因由其些然前外天政四日那社义事平形相全表间样与关各重新线内数正心反你明看原又么利比或但质气第向道命此变条只没结解问意建月公无系军很情者最立代想已通并提直题党程展五果料象员革位入常文总次品式活设及管特件长求老头基资边流路级少图山统接知较将组见计别她手角期根论运农指几九区强放决西被干做必战先回则任取据处队南给色光门即保治北造百规热领七海口东导器压志世金增争济阶油思术极交受联什认六共权收证改清己美再采转更单风切打白教速花带安场身车例真务具万每目至达走积示议声报斗完类八离华名确才科张信马节话米整空元况今集温传土许步群广石记需段研界拉林律叫且究观越织装影算低持音众书布复容儿须际商非验连断深难近矿千周委素技备半办青省列习响约支般史感劳便团往酸历市克何除消构府称太准精值号率族维划选标写存候毛亲快效斯院查江型眼王按格养易置派层片始却专状育厂京识适属圆包火住调满县局照参红细引听该铁价严龙飞"
EN_WORDS = (
    "the model token vocabulary merge adapter llama server python linux debian package install "
    "config file data train test run build deploy quantize memory speed chat open source network"
).split()
PUNCT_ZH = "，。！？；：、"
EMOJI = "😀🚀🌏🍵📚"


def _any_number(rng: random.Random, high: int) -> int:
    return rng.randint(0, high)


def chinese_sentence(rng: random.Random, min_words: int = 4, max_words: int = 14,
                     number: Callable[[random.Random, int], int] = _any_number) -> str:
    """One sentence, mostly Chinese words with single characters, rare English, digits and emoji.

    ``number(rng, high)`` draws the numbers written in digits (the quickstart's keeps out its held-out
    numbers); the default draws uniformly from 0..high."""
    parts: list[str] = []
    for _ in range(rng.randint(min_words, max_words)):
        r = rng.random()
        if r < 0.70:
            parts.append(rng.choice(ZH_WORDS))
        elif r < 0.85:
            parts.append(rng.choice(ZH_CHARS))
        elif r < 0.92:
            parts.append(f" {rng.choice(EN_WORDS)} ")
        elif r < 0.97:
            parts.append(str(number(rng, 2026)))
        elif r < 0.985:
            parts.append(rng.choice(EMOJI))
        else:
            parts.append(rng.choice(PUNCT_ZH[:2]))
    return "".join(parts).strip() + rng.choice(PUNCT_ZH[1:4])


def english_sentence(rng: random.Random, min_words: int = 4, max_words: int = 14,
                     number: Callable[[random.Random, int], int] = _any_number,
                     words: Sequence[str] = EN_WORDS) -> str:
    words = [rng.choice(words) for _ in range(rng.randint(min_words, max_words))]
    if rng.random() < 0.3:
        words.insert(rng.randrange(len(words)), str(number(rng, 99999)))
    return " ".join(words).capitalize() + "."


def chinese_lines(n: int, seed: int = 0) -> list[str]:
    """``n`` lines of synthetic Chinese text (1-3 sentences each), reproducible from ``seed``."""
    rng = random.Random(seed)
    return ["".join(chinese_sentence(rng) for _ in range(rng.randint(1, 3))) for _ in range(n)]


def english_lines(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(english_sentence(rng) for _ in range(rng.randint(1, 3))) for _ in range(n)]


def write_lines(path, lines) -> Path:
    """Write ``lines`` (one per line, UTF-8) atomically to ``path``; returns the path."""
    from cllama_deploy.files import write_text_atomic

    return write_text_atomic(Path(path), "".join(line + "\n" for line in lines))
