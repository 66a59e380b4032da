"""Prompts for distilling a draft model and for evaluating it, built offline from templates.

No data set can be downloaded here, so prompts are composed from instruction templates and topic
lists. Training and evaluation use disjoint topics *and* disjoint templates, so the held-out set
is never seen in training (`held_out_prompts` is what `bild eval` measures on).
"""
from __future__ import annotations

import random

TRAIN_TEMPLATES = [
    "Explain {t} to a ten-year-old.",
    "Write a short poem about {t}.",
    "What are three interesting facts about {t}?",
    "Give me a step-by-step guide to getting started with {t}.",
    "Write a two-sentence story that involves {t}.",
    "What are the pros and cons of {t}?",
    "Describe {t} in one paragraph.",
    "Why do people care about {t}?",
    "List five words associated with {t} and explain each briefly.",
    "How would you teach a beginner about {t}?",
    "Write a friendly email inviting a colleague to a talk on {t}.",
    "What is a common misconception about {t}?",
    "Summarize the history of {t} in a few sentences.",
    "Compare {t} with something from everyday life.",
]
MORE_TRAIN_TEMPLATES = [
    "Write a limerick about {t}.",
    "What would a world without {t} look like?",
    "Give three tips for someone interested in {t}.",
    "Explain {t} in exactly three sentences.",
    "Write a short dialogue between two friends about {t}.",
    "What questions do scientists still ask about {t}?",
    "Describe {t} to someone who has never heard of it.",
    "Write a product description for a book about {t}.",
    "What is the most important thing to know about {t}?",
    "Tell a short fable that teaches a lesson using {t}.",
    "How has {t} changed over the last hundred years?",
    "Write a tweet about {t}.",
    "What jobs are connected to {t}?",
    "Give an analogy that explains {t}.",
    "Write a motivational message inspired by {t}.",
    "What are some fun activities related to {t} for a weekend?",
]
MORE_TRAIN_TOPICS = [
    "elephants", "rainbows", "the internet", "gardening", "jazz music", "castles", "astronauts", "dinosaurs",
    "chocolate", "electric cars", "the ocean", "board games", "museums", "recycling paper", "hiking",
    "ancient Egypt", "the brain", "wind energy", "birds migrating", "cooking rice", "tennis", "dreams",
    "languages", "maps", "clocks", "umbrellas", "the sun", "frogs", "space stations", "poetry", "cities",
    "farming", "money", "music festivals", "running shoes", "the immune system", "ants", "sharks", "magnets",
    "electricity", "ice cream", "camping", "writing letters", "skyscrapers", "the moon landing", "fireworks",
    "computers", "mushrooms", "rain", "thunderstorms", "honey", "vitamins", "the desert at night", "wolves",
    "guitars", "video games", "newspapers", "volcanic islands", "bicycle repair", "saving energy at home",
    "learning to swim", "the first airplane", "coffee shops", "zoos", "tides", "pirates", "knights",
    "the Renaissance", "mathematics", "fractions", "gravity", "plastic pollution", "teamwork", "kindness",
]
EVAL_TEMPLATES = [
    "Tell me something surprising about {t}.",
    "Can you describe how {t} works, briefly?",
    "Write a haiku about {t}.",
]
TRAIN_TOPICS = [
    "photosynthesis", "the moon", "volcanoes", "recycling", "bicycles", "chess", "coffee", "honeybees",
    "the internet", "rainbows", "gardening", "dinosaurs", "the ocean", "electric cars", "music theory",
    "the Roman Empire", "climate change", "friendship", "time management", "cooking pasta", "black holes",
    "machine learning", "the water cycle", "mountains", "libraries", "football", "trains", "solar panels",
    "vaccines", "the human heart", "penguins", "origami", "earthquakes", "democracy", "public speaking",
    "budgeting", "deserts", "the printing press", "sleep", "meditation", "rivers", "airplanes", "bread baking",
    "the stock market", "yoga", "robots", "forests", "photography", "the Olympic games", "volunteering",
    "bridges", "painting", "whales", "birthdays", "snow", "smartphones", "the alphabet", "pyramids", "tea",
]
EVAL_TOPICS = [
    "octopuses", "lighthouses", "the violin", "glaciers", "hot air balloons", "bees in winter", "comets",
    "cheese making", "submarines", "kites", "coral reefs", "the periodic table", "windmills", "owls",
    "marathons", "the Great Wall of China",
]
PARAGRAPHS = [
    "The city council met on Tuesday to discuss a plan to expand the public bus network. Supporters said "
    "more routes would reduce traffic and help workers reach jobs, while critics worried about the cost. "
    "The council agreed to study the plan for three more months before voting.",
    "A small bakery in the town center started giving its unsold bread to a local shelter every evening. "
    "The owner said the idea came from her grandmother, who never wasted food. Other shops have since "
    "joined, and the shelter now receives fresh food daily.",
    "Scientists observed a rare bird species nesting in a national park for the first time in forty years. "
    "They believe that recent efforts to restore wetlands brought the birds back. Visitors are asked to "
    "keep their distance so the nests are not disturbed.",
    "The school introduced a new reading program in which older students read with younger ones once a "
    "week. Teachers report that both groups now read more at home. The program will be extended to two "
    "other schools next year.",
]
EVAL_PARAGRAPHS = [
    "After heavy rain, the river rose quickly and flooded several streets near the old market. Volunteers "
    "filled sandbags through the night, and no one was hurt. The city plans to build a higher wall along "
    "the river next summer.",
    "A group of students built a small robot that sorts plastic from paper in recycling bins. They won a "
    "regional science prize and hope to test the robot in their school cafeteria. Local companies have "
    "offered to help them improve it.",
]
SENTENCES = ["Good morning, how are you?", "The cat is sleeping on the sofa.", "I would like a cup of tea.",
             "Where is the train station?", "The weather is nice today.", "We are going to the beach tomorrow.",
             "This book is very interesting.", "Please close the window."]
EVAL_SENTENCES = ["My brother plays the guitar.", "The museum opens at nine.", "It is raining again."]
LANGUAGES = ["French", "Spanish", "German"]


def train_prompts(n: int | None = None, seed: int = 0) -> list[str]:
    """Chat instructions, summaries and translations from the training templates and topics."""
    out = [t.format(t=topic) for t in TRAIN_TEMPLATES for topic in TRAIN_TOPICS]
    topics = TRAIN_TOPICS + MORE_TRAIN_TOPICS
    out += [t.format(t=topic) for t in MORE_TRAIN_TEMPLATES for topic in topics]
    out += [t.format(t=topic) for t in TRAIN_TEMPLATES for topic in MORE_TRAIN_TOPICS]
    out += [f"Summarize this paragraph in one sentence:\n\n{p}" for p in PARAGRAPHS]
    out += [f"Summarize the following text for a busy reader:\n\n{p}" for p in PARAGRAPHS]
    out += [f"Translate into {lang}: {s}" for s in SENTENCES for lang in LANGUAGES]
    random.Random(seed).shuffle(out)
    return out if n is None else out[:n]


def held_out_prompts() -> list[str]:
    """The fixed evaluation set (>= 50 prompts) that training never sees: other templates, topics, texts."""
    out = [t.format(t=topic) for t in EVAL_TEMPLATES for topic in EVAL_TOPICS]
    out += [f"Summarize this paragraph in one sentence:\n\n{p}" for p in EVAL_PARAGRAPHS]
    out += [f"Translate into {lang}: {s}" for s in EVAL_SENTENCES for lang in LANGUAGES]
    return out
