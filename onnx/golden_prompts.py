"""Prompts for the tokenizer goldens: hand-written edge cases plus deterministic generated ones."""

import random

HAND_WRITTEN = [
    # empty and whitespace
    "",
    " ",
    "   ",
    "\t",
    "\n",
    "\r\n",
    " \t\n ",
    "a",
    " a ",
    "a  photo   of    a     cat",
    "a\tphoto\tof\ta\tcat",
    "a\nphoto\nof\na\ncat",
    "\u00a0non-breaking\u00a0space",
    "zero\u200bwidth\u200bspace",
    "ideographic\u3000space",
    # the reference sentence and casing
    "a photo of a cat",
    "A Photo Of A Cat",
    "A PHOTO OF A CAT",
    "a PhOtO oF a CaT",
    "iPhone macOS McDonald's O'Neill",
    "CamelCaseWordsRunTogether",
    "snake_case_words_and__double",
    "kebab-case-words-and--double",
    # punctuation
    "hello, world!",
    "hello,world!",
    "wow!!",
    "wow!!!",
    "!",
    "!!",
    "!!!",
    "! ! !",
    "hi! hi!! hi!!!",
    "what?!",
    "?!?!",
    "...",
    "wait... what....",
    "a.b.c.d",
    "(masterpiece:1.2), (best quality), [blurry]",
    "((((extremely detailed))))",
    "{a|b|c}",
    "<lora:style:0.8>",
    "a, b; c: d - e -- f --- g",
    "#hashtag @mention $dollar %percent ^caret &amp *star",
    "quotes \"double\" 'single' `back`",
    "“curly quotes” and ‘single curly’",
    "«guillemets» and „low quotes“",
    "em—dash en–dash ‐ hyphen",
    "slash/separated\\backslash|pipe",
    "~tilde~ =equals= +plus+ _under_",
    "😀!",
    # apostrophes and contractions
    "don't",
    "Don't",
    "DON'T",
    "can't won't shouldn't",
    "it's a dog's life",
    "we'll we're we've I'm I'd you'll",
    "the cats' toys",
    "rock 'n' roll",
    "'quoted'",
    "don’t (curly apostrophe)",
    "y'all'd've",
    "'s 't 're 've 'm 'll 'd",
    # numbers
    "1",
    "42",
    "1234567890",
    "3.14159",
    "1,000,000",
    "8k uhd",
    "4K 8K 16K",
    "1girl 2boys",
    "f/1.8 50mm iso100",
    "1/250s",
    "1990s 80's '70s",
    "v2.1 v3 sdxl1.0",
    "0x1F 0b1010",
    "-5 +5 ±5",
    "1st 2nd 3rd 4th",
    "١٢٣ ४५६ 七八九",
    "①②③",
    # accents and other scripts
    "café",
    "cafe\u0301 (decomposed accent)",
    "naïve façade",
    "crème brûlée",
    "Ångström Øresund Æsir",
    "straße STRASSE",
    "İstanbul ıi",
    "Ελληνικά λέξεις",
    "русский текст",
    "עברית",
    "العربية",
    "हिन्दी",
    "ภาษาไทย",
    "한국어 문장",
    "東京の夜景",
    "東京タワー",
    "中文提示词，山水画",
    "日本語のプロンプト、桜",
    "ｆｕｌｌｗｉｄｔｈ ＡＢＣ １２３",
    "ﬁ ﬂ ligatures",
    "café crème, 東京の夜景 🌃, naïve façade",
    # emoji
    "🌃",
    "🐱",
    "🐱🐶🐭",
    "a cat 🐱 and a dog 🐶",
    "👍🏽",
    "👨‍👩‍👧‍👦 family",
    "🇯🇵 flag",
    "❤️",
    "✨ sparkles ✨",
    "emoji🙂glued",
    # HTML entities and markup
    "&amp;",
    "&lt;tag&gt;",
    "fish &amp; chips",
    "&quot;quoted&quot;",
    "&#39;apos&#39;",
    "&nbsp;",
    "<b>bold</b>",
    "<|startoftext|>",
    "<|endoftext|>",
    "a <|endoftext|> b",
    "<|startoftext|>a photo<|endoftext|>",
    "</w>",
    "https://example.com/path?q=1&r=2",
    "user@example.com",
    # repetition
    "cat cat cat cat cat cat cat cat",
    "cat " * 40,
    "the the the the",
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
    "abababababababababababab",
    "!" * 80,
    "ha" * 50,
    "supercalifragilisticexpialidocious",
    "pneumonoultramicroscopicsilicovolcanoconiosis",
    # lengths around the 77-token limit
    " ".join(["word"] * 74),
    " ".join(["word"] * 75),
    " ".join(["word"] * 76),
    " ".join(["word"] * 77),
    " ".join(["word"] * 200),
    (
        "a highly detailed matte painting of an ancient city built into the side of a colossal "
        "waterfall at golden hour, intricate stone bridges, hanging gardens, flocks of white birds, "
        "volumetric light rays through the mist, tiny figures walking along the terraces, "
        "dramatic clouds, cinematic composition, ultra wide angle, trending on artstation, "
        "octane render, 8k resolution, sharp focus, vivid colors, masterpiece, award winning"
    ),
    # typical prompts
    "a photograph of an astronaut riding a horse",
    "blurry, low quality",
    "an oil painting in the style of van gogh",
    "cartoon, lowres",
    "portrait of a woman, studio lighting, 85mm, bokeh",
    "cyberpunk street at night, neon signs, rain, reflections",
    "isometric pixel art of a cozy cottage",
    "low poly 3d render of a fox",
    "watercolor landscape with mountains and a lake",
    "ugly, deformed, extra fingers, bad anatomy, watermark, text",
    "Photo of a golden retriever puppy playing in the snow, shallow depth of field",
    "macro shot of a dew drop on a leaf",
    "A steampunk airship over Victorian London, sepia tone",
    "minimalist logo of a mountain, vector, flat design",
    "RAW photo, DSLR, film grain, Fujifilm XT3",
]

_WORDS = [
    "cat", "dog", "astronaut", "castle", "forest", "ocean", "city", "robot", "dragon", "flower",
    "portrait", "landscape", "sunset", "night", "neon", "vintage", "futuristic", "detailed",
    "cinematic", "lighting", "masterpiece", "photorealistic", "anime", "watercolor", "sketch",
    "golden", "hour", "misty", "mountains", "river", "bridge", "street", "rain", "snow", "desert",
    "underwater", "space", "galaxy", "nebula", "octane", "render", "unreal", "engine", "bokeh",
    "macro", "wide", "angle", "symmetrical", "intricate", "ornate", "baroque", "minimalist",
    "surreal", "dreamlike", "ethereal", "gloomy", "vibrant", "pastel", "monochrome", "sepia",
    "Tokyo", "Paris", "New", "York", "Renaissance", "Gothic", "Art", "Nouveau", "Bauhaus",
    "don't", "it's", "artist's", "children's", "rock'n'roll",
]
_EXTRAS = [
    "café", "naïve", "jalapeño", "Zürich", "São", "Paulo", "東京", "京都", "桜", "猫", "서울",
    "Москва", "Αθήνα", "🌃", "🐱", "🔥", "✨", "🎨", "👍", "&amp;", "&lt;3", "8k", "4k", "1girl",
    "85mm", "f/1.4", "1990s", "(best:1.3)", "[blurry]", "((detailed))", "!!", "?", "...", "--",
]
_SEPARATORS = [" ", " ", " ", ", ", ",", "  ", "\t", " | ", "; ", " - ", "\n", "."]


def generated(count=150, seed=20261128):
    """Deterministic word salads: words, extras, casing changes and separators."""
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        length = rng.choice([1, 2, 3, 5, 8, 13, 21, 40, 90])
        parts = []
        for _ in range(length):
            word = rng.choice(_EXTRAS) if rng.random() < 0.2 else rng.choice(_WORDS)
            r = rng.random()
            if r < 0.1:
                word = word.upper()
            elif r < 0.2:
                word = word.capitalize()
            parts.append(word)
            parts.append(rng.choice(_SEPARATORS))
        text = "".join(parts[:-1])
        if rng.random() < 0.2:
            text = " " * rng.randint(1, 3) + text + " " * rng.randint(1, 3)
        out.append(text)
    return out


def prompts():
    """All tokenizer golden prompts, hand-written first, without duplicates."""
    seen = set()
    result = []
    for text in HAND_WRITTEN + generated():
        if text not in seen:
            seen.add(text)
            result.append(text)
    return result
