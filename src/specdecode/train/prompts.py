"""Prompts for self-distillation, made from templates and word lists with a seeded generator.

Nothing here comes from Spec-Bench (which stays held out for measuring). The mix covers what chat
users ask - explanations, stories, lists, how-tos, code, arithmetic word problems, rewriting, and
questions about a passage given in the prompt (the passages are the target's own earlier answers,
so the draft also learns to copy from its context).
"""

from __future__ import annotations

import random

TOPICS = """photosynthesis; black holes; the water cycle; compound interest; machine learning; the French Revolution;
volcanoes; the immune system; climate change; recycling; the stock market; electric cars; the Roman Empire;
sleep; coffee; honeybees; the internet; vaccines; earthquakes; renewable energy; the moon landing; democracy;
inflation; plate tectonics; the human heart; gravity; bread baking; chess; the Renaissance; oceans; rainforests;
cryptography; the printing press; jazz; marathon training; meditation; urban gardening; time zones; rainbows;
the periodic table; antibiotics; supply and demand; the Great Wall of China; solar panels; dinosaurs; glaciers;
social media; public libraries; the Olympic Games; tea ceremonies; bicycles; DNA; nuclear fusion; bird migration;
the Silk Road; budgeting; remote work; volunteering; the Pythagorean theorem; probability; memory; languages;
museums; trains; satellites; mushrooms; deserts; coral reefs; sourdough; photography; origami; robotics; vitamins""".replace("\n", " ")

THINGS = """a lonely robot; a brave mouse; an old lighthouse keeper; a talking cat; a lost astronaut; a young chef;
a clockmaker; a dragon who cannot fly; a girl who collects maps; a retired detective; a tiny village; a magic
umbrella; a forgotten library; a friendly ghost; a traveling musician; twin sisters; a stubborn goat""".replace("\n", " ")

AUDIENCES = ["a ten-year-old", "a beginner", "a busy manager", "a high school student", "a grandparent", "an engineer"]

TASKS = """sort a list of numbers; check if a word is a palindrome; count the vowels in a string; compute the factorial
of n; find the largest element in a list; reverse a linked list; merge two sorted lists; compute Fibonacci numbers;
remove duplicates from a list; convert Celsius to Fahrenheit; check if a number is prime; count word frequencies
in a text; flatten a nested list; compute the average of a list; validate an email address""".replace("\n", " ")

LANGS = ["Python", "JavaScript", "Python", "C", "Python", "Go"]

NAMES = ["Anna", "Ben", "Carlos", "Dana", "Emil", "Fatima", "Greg", "Hana", "Ivan", "Julia", "Kofi", "Lena"]
ITEMS = ["apples", "books", "marbles", "pencils", "cookies", "stickers", "tickets", "cards"]


def _split(s: str) -> list[str]:
    return [x.strip() for x in s.split(";") if x.strip()]


def vocabulary_words(tokenizer, min_len: int = 5) -> list[str]:
    """Whole lower-case words of the target's own vocabulary (SmolLM2: ~18,000), as topics far
    beyond the hand-written lists; a few are word pieces, which the target reads as the word."""
    words = set()
    for piece in tokenizer.get_vocab():
        text = tokenizer.convert_tokens_to_string([piece])
        if text.startswith(" ") and text[1:].isascii() and text[1:].isalpha() and text[1:].islower() and len(text) > min_len:
            words.add(text[1:])
    return sorted(words)


def seed_prompts(n: int, seed: int, topics: list[str] | None = None) -> list[str]:
    """``n`` prompts that need no passage (topics from ``topics``, else the hand-written list)."""
    rng = random.Random(seed)
    topics, things, tasks = topics or _split(TOPICS), _split(THINGS), _split(TASKS)
    makers = [
        lambda: f"Explain {rng.choice(topics)} to {rng.choice(AUDIENCES)}.",
        lambda: f"Write a short story about {rng.choice(things)}.",
        lambda: f"List five interesting facts about {rng.choice(topics)}.",
        lambda: f"What are the pros and cons of {rng.choice(topics)}?",
        lambda: f"Write a {rng.choice(LANGS)} function to {rng.choice(tasks)}. Explain how it works.",
        lambda: f"Give me step-by-step instructions for getting started with {rng.choice(topics)}.",
        lambda: f"Write a short poem about {rng.choice(topics)}.",
        lambda: f"Write a paragraph about {rng.choice(topics)}.",
        lambda: _word_problem(rng),
        lambda: f"Compare {rng.choice(topics)} and {rng.choice(topics)} in a few sentences.",
        lambda: f"Write an email to a friend inviting them to learn about {rng.choice(topics)}.",
        lambda: f"What is the history of {rng.choice(topics)}?",
        lambda: f"Answer briefly: why is {rng.choice(topics)} important?",
    ]
    return [rng.choice(makers)() for _ in range(n)]


def _word_problem(rng: random.Random) -> str:
    a, b = rng.sample(NAMES, 2)
    item = rng.choice(ITEMS)
    x, y, z = rng.randint(3, 40), rng.randint(2, 20), rng.randint(2, 6)
    return (f"{a} has {x} {item}. {b} gives {a} {y} more, and then {a} shares them equally among {z} friends. "
            f"How many {item} does each friend get, and how many are left over? Think step by step.")


def passage_prompts(passages: list[str], n: int, seed: int) -> list[str]:
    """``n`` prompts that ask about, summarise or rewrite one of ``passages``."""
    rng = random.Random(seed)
    asks = [
        "Summarize the following text in two sentences.",
        "Summarize the following text.",
        "Extract the key facts from the following text as a bulleted list.",
        "Rewrite the following text in simpler words.",
        "Based on the passage below, what is the main idea? Quote the sentence that supports it.",
        "Read the passage and answer: what are the most important details?",
    ]
    out = []
    for _ in range(n):
        text = rng.choice(passages)
        out.append(f"{rng.choice(asks)}\n\n{text}")
    return out


PEOPLE = """a pirate captain; a medieval knight; a tour guide in Rome; a friendly librarian; a space station commander;
a personal trainer; a job interviewer; a customer support agent; a chef on a cooking show; a wise old wizard;
a museum curator; a detective from the 1920s; a travel agent; a science teacher; a sports commentator""".replace("\n", " ")

OBJECTS = """a smartphone; a bicycle helmet; a coffee maker; a pair of running shoes; a garden hose; a laptop bag;
a desk lamp; a water bottle; a backpack; an umbrella; a board game; a houseplant; a kitchen knife set""".replace("\n", " ")

LANGUAGE_NAMES = ["French", "Spanish", "German", "Italian", "Portuguese"]

FORMATS = ["a haiku", "a limerick", "a tweet", "a news headline", "a product review", "a diary entry", "a short speech",
           "a recipe", "a letter of complaint", "a movie plot summary", "a job advertisement", "a dialogue between two friends"]


def varied_prompts(n: int, seed: int, passages: list[str], topics: list[str] | None = None) -> list[str]:
    """``n`` prompts of further kinds (role play, translation, formats, code, reasoning, passages)."""
    rng = random.Random(seed)
    topics, things, tasks = topics or _split(TOPICS), _split(THINGS), _split(TASKS)
    people, objects = _split(PEOPLE), _split(OBJECTS)

    def sentence() -> str:
        text = rng.choice(passages) if passages else f"{rng.choice(topics)} is interesting."
        parts = [s.strip() for s in text.replace("\n", " ").split(". ") if len(s.split()) > 4]
        return (rng.choice(parts) if parts else text[:200]).rstrip(".") + "."

    makers = [
        lambda: f"Pretend you are {rng.choice(people)}. {rng.choice(['Introduce yourself.', 'Describe your typical day.', 'Give me some advice.', 'Tell me about your biggest challenge.'])}",
        lambda: f"Translate into {rng.choice(LANGUAGE_NAMES)}: {sentence()}",
        lambda: f"Write {rng.choice(FORMATS)} about {rng.choice(topics + things)}.",
        lambda: f"Describe {rng.choice(objects)} and explain how to take care of it.",
        lambda: f"Write a {rng.choice(LANGS)} program that reads input and does the following: {rng.choice(tasks)}. Add comments.",
        lambda: "Fix the bugs in this code and explain them:\n\ndef f(xs):\n    total = 0\n    for i in range(len(xs) + 1):\n        total += xs[i]\n    return total / len(xs)",
        lambda: f"If a train travels {rng.randint(30, 120)} km/h for {rng.randint(2, 9)} hours, how far does it go? Explain the calculation.",
        lambda: f"What is {rng.randint(12, 99)} times {rng.randint(3, 19)} plus {rng.randint(5, 500)}? Show your work.",
        lambda: f"A rectangle is {rng.randint(2, 30)} cm long and {rng.randint(2, 30)} cm wide. What are its area and perimeter?",
        lambda: f"Is it true that {sentence().rstrip('.').lower()}? Explain your reasoning.",
        lambda: f"Give three arguments for and three against {rng.choice(topics)}.",
        lambda: f"Classify the sentiment of this sentence as positive, negative or neutral, and explain why: {sentence()}",
        lambda: f"Text: {rng.choice(passages) if passages else ''}\n\nQuestion: what does the text say about the main subject? Answer using the text.",
        lambda: f"Create a multiple-choice quiz question about {rng.choice(topics)} with four options and the answer.",
        lambda: f"Plan a one-day trip for someone interested in {rng.choice(topics)}.",
        lambda: f"What would happen if {rng.choice(topics)} disappeared from the world tomorrow?",
        lambda: f"Write a conversation between {rng.choice(people)} and {rng.choice(things)}.",
        lambda: f"Summarize in one paragraph what {rng.choice(AUDIENCES)} should know about {rng.choice(topics)}.",
        lambda: f"Extract every number and what it refers to from this text:\n\n{rng.choice(passages) if passages else ''}",
        lambda: f"Explain the difference between {rng.choice(topics)} and {rng.choice(topics)} using a table.",
    ]
    return [rng.choice(makers)() for _ in range(n)]


ASKS = ["Can you help me understand {t}?", "What is {t}?", "How does {t} work?", "Tell me something surprising about {t}.",
        "I'm writing a school report on {t}. What should I include?", "Why do people care about {t}?",
        "What are common mistakes people make with {t}?", "Give me a simple example of {t}.",
        "How would you explain {t} in one sentence, and then in more detail?", "What's the connection between {t} and {u}?",
        "Write a short essay on {t}.", "Describe a day in the life of someone who works with {t}.",
        "What questions should I ask an expert on {t}?", "Write a story in which {t} and {u} both matter."]


def broad_prompts(n: int, seed: int, words: list[str], passages: list[str]) -> list[str]:
    """``n`` prompts over topics drawn from ``words`` (the target's vocabulary): a third in the
    phrasings of the seed round, a third of the varied kinds, a third as users ask in their own words."""
    rng = random.Random(seed)
    out = seed_prompts(n // 3, seed + 1, words) + varied_prompts(n // 3, seed + 2, passages, words)
    while len(out) < n:
        t, u = rng.sample(words, 2)
        out.append(rng.choice(ASKS).format(t=t, u=u))
    rng.shuffle(out)
    return out


GROUNDED = [
    "Summarize the following article.\n\n{doc}",
    "Summarize the following text in {k} sentences.\n\n{doc}",
    "{doc}\n\nSummarize the text above in one paragraph.",
    "Read the text below and list its key points as bullets.\n\n{doc}",
    "Extract the names, numbers and dates mentioned in the following text, each with what it refers to.\n\n{doc}",
    "Write a short title for this text, then a one-sentence summary.\n\n{doc}",
    "Text: {doc}\n\nWhat is the main point of the text? Answer in your own words.",
    "Rewrite the following text for {audience}.\n\n{doc}",
    "Continue the following text with one more paragraph in the same style.\n\n{doc}",
    "{docs}\n\nUsing only the documents above, answer this question: {question}",
    "Answer the question based on the context.\n\nContext:\n{docs}\n\nQuestion: {question}",
    "Here is some background information.\n\n{docs}\n\n{question}",
]


def grounded_prompts(sources: list[tuple[str, str]], n: int, seed: int, max_chars: int = 2400) -> list[str]:
    """``n`` requests over longer contexts made of the target's own writing: summaries, key points,
    extraction and rewriting of one or two of its answers run together (an article), and questions
    answered from one to three of them (documents, as in retrieval-augmented chat) where one document
    is the target's answer to that very question. ``sources`` are (request, answer) pairs; contexts are
    kept under ``max_chars``. The draft learns to read and copy from a long prompt, which requests
    written from the chat template alone (a line or two) never ask for."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        form = rng.choice(GROUNDED)
        picked = rng.sample(sources, min(len(sources), rng.randint(1, 3) if "{docs}" in form else rng.randint(1, 2)))
        texts, budget = [], max_chars
        for _, answer in picked:  # whole sentences: answers cut off by the length limit end mid-way
            answer = answer[: answer.rfind(".") + 1] or answer
            if texts and len(answer) > budget:
                break
            text = answer[:budget]
            texts.append(text[: text.rfind(".") + 1] or text)
            budget -= len(texts[-1])
        if "{docs}" in form:
            question = picked[0][0]
            order = list(range(len(texts)))
            rng.shuffle(order)
            docs = "\n\n".join(f"Document {i + 1}: {texts[k]}" for i, k in enumerate(order))
            out.append(form.format(docs=docs, question=question))
        else:
            out.append(form.format(doc="\n\n".join(texts), k=rng.randint(2, 4), audience=rng.choice(AUDIENCES)))
    return out
