"""Prompts for distilling a draft model and for evaluating it, built offline from templates.

No data set can be downloaded here, so prompts are composed from instruction templates and topic
lists. Training and evaluation use disjoint topics *and* disjoint templates, so the held-out set
is never seen in training (`held_out_prompts` is what `bild eval` measures on).
"""
from __future__ import annotations

import random
from functools import lru_cache
from pathlib import Path

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

EXTRA_TRAIN_TEMPLATES = [
    "What is {t}?",
    "Give me a quick overview of {t}.",
    "Write a short paragraph for a school newsletter about {t}.",
    "What should a beginner avoid when it comes to {t}?",
    "Explain why {t} matters, in simple words.",
    "Write four lines of rhyming verse about {t}.",
    "If you could ask an expert one question about {t}, what would it be and why?",
    "Describe a typical day for someone who works with {t}.",
    "What are two arguments for and two against {t}?",
    "Write a short speech opening about {t}.",
    "Summarize what you know about {t} in five bullet points.",
    "Write a riddle whose answer is {t}.",
    "How would you explain {t} to your grandmother?",
    "Write a short blog post introduction about {t}.",
    "What is the connection between {t} and nature?",
    "Create a short quiz with three questions about {t}.",
    "Write a thank-you note that mentions {t}.",
    "What might the future of {t} look like?",
    "Give a short definition of {t} and one example.",
    "Write a diary entry from someone discovering {t} for the first time.",
    "What are the main parts or ideas of {t}?",
    "Write a slogan and a short explanation for a campaign about {t}.",
    "Why might a child find {t} exciting?",
    "Write a short review of an imaginary documentary about {t}.",
    "List three myths and three facts about {t}.",
    "Explain {t} using a cooking metaphor.",
    "What would you tell a friend who wants to learn about {t}?",
    "Describe the sounds, colors and smells you associate with {t}.",
]
EXTRA_TRAIN_TOPICS = [
    "butterflies", "the printing of books", "street food", "lightning", "glass making", "trees in autumn",
    "the human skeleton", "sea turtles", "horses", "the piano", "soap", "the postal service", "bamboo",
    "night trains", "the Amazon rainforest", "polar bears", "spiders", "pottery", "knitting", "sailing",
    "skateboarding", "the Moon's phases", "the solar system", "Mars", "saturn's rings", "telescopes",
    "microscopes", "bacteria", "the digestive system", "dental care", "swimming pools",
    "basketball", "baseball", "cricket", "table tennis", "the Tour de France", "ballet", "opera", "theatre",
    "movies", "cartoons", "comic books", "libraries in the future", "school uniforms", "homework",
    "learning a new language", "typing", "handwriting", "calligraphy", "the Eiffel Tower", "Venice",
    "the Sahara", "the Alps", "the Nile", "islands", "rain forests", "caves", "waterfalls", "lakes",
    "wetlands", "prairies", "the Arctic", "Antarctica", "penguin chicks", "camels", "giraffes", "lions",
    "tigers", "pandas", "koalas", "kangaroos", "dolphins", "salmon", "jellyfish", "crabs", "snails",
    "earthworms", "compost", "vegetable gardens", "tomatoes", "potatoes", "apples", "oranges", "bananas",
    "rice farming", "wheat", "corn", "olive oil", "spices", "soup", "pizza", "sushi", "pancakes", "salads",
    "breakfast", "picnics", "family dinners", "holidays", "new year celebrations", "weddings", "gifts",
    "letters from friends", "postcards", "stamps", "coins", "banks", "saving money", "shopping",
    "online shopping", "advertising", "social media", "email", "passwords", "cybersecurity", "printers",
    "keyboards", "batteries", "light bulbs", "refrigerators", "washing machines", "elevators", "escalators",
    "traffic lights", "roads", "tunnels", "ships", "harbors", "helicopters", "rockets", "satellites",
    "the weather forecast", "clouds", "fog", "wind", "hurricanes", "seasons", "summer", "winter", "spring",
    "autumn leaves", "sunsets", "stars", "constellations", "the night sky", "northern lights", "eclipses",
    "rocks and minerals", "fossils", "gold", "diamonds", "iron", "copper", "water", "salt", "sugar",
    "bread", "milk", "eggs", "chickens", "cows", "sheep", "goats", "dogs", "cats", "rabbits", "hamsters",
    "goldfish", "parrots", "pigeons", "eagles", "bats", "hedgehogs", "squirrels", "foxes", "bears",
    "deer", "mice", "ladybugs", "dragonflies", "grasshoppers", "mosquitoes", "flowers", "roses",
    "sunflowers", "cactus plants", "moss", "seeds", "roots", "leaves", "wood", "paper", "pencils", "erasers",
    "notebooks", "backpacks", "shoes", "hats", "scarves", "sweaters", "sewing", "fashion", "colors",
    "the color blue", "shapes", "numbers", "prime numbers", "geometry", "algebra", "statistics",
    "probability", "logic puzzles", "crosswords", "sudoku", "card games", "puzzles", "toys", "dolls",
    "building blocks", "playgrounds", "parks", "gyms", "stretching", "walking",
    "healthy eating", "drinking water", "first aid", "hospitals", "nurses", "doctors", "firefighters",
    "police officers", "teachers", "scientists", "engineers", "artists", "writers", "musicians", "chefs",
    "pilots", "farmers", "carpenters", "plumbers", "electricians", "architects", "inventors", "explorers",
    "the wheel", "the telephone", "the radio", "television", "the camera", "the compass", "paper money",
    "the calendar", "the microscope's invention", "steam engines", "factories", "robots at work",
    "artificial intelligence", "computer programming", "video calls", "electric bicycles", "public parks",
    "clean air", "noise pollution", "planting trees", "saving water", "renewable energy", "nuclear energy",
    "oil", "coal", "natural gas", "hydropower", "energy storage", "electric grids", "smart homes",
]
EXTRA_PARAGRAPHS = [
    "The town library opened a repair cafe where volunteers fix broken toasters, lamps and bicycles for free. "
    "Visitors bring their items on Saturday mornings and learn how to repair them. The library says fewer "
    "things are thrown away since the cafe started.",
    "A farmer in the valley switched from chemical sprays to planting flowers between her crops. The flowers "
    "attract insects that eat the pests. After two seasons her harvest is as large as before, and she spends "
    "less money on sprays.",
    "Engineers finished a new footbridge over the railway line, so children no longer have to walk a long "
    "way round to reach school. The bridge has ramps for wheelchairs and bicycles. It was built in six months, "
    "two weeks ahead of schedule.",
    "A hospital started letting volunteers read stories to patients in the long-stay ward. Nurses noticed "
    "that patients slept better and felt less lonely. The hospital now trains twenty new volunteers each year.",
    "The football club planted two hundred trees around its stadium to give shade to fans in summer. Local "
    "schools helped with the planting. The club plans to water the young trees with rain collected from the roof.",
    "A young chef opened a restaurant that serves only food grown within fifty kilometres. The menu changes "
    "every week with the seasons. Customers say the food tastes fresher, though some dishes disappear quickly.",
]
EXTRA_SENTENCES = ["I am learning to cook.", "The children are playing in the garden.", "How much does this cost?",
                   "The shop closes at six.", "My sister lives in a big city.", "We need more bread and milk.",
                   "The dog is waiting at the door.", "I forgot my umbrella at home.", "Thank you for your help.",
                   "The train is late again.", "Can you help me find the hotel?", "She reads a book every week."]
EXTRA_LANGUAGES = ["French", "Spanish", "German", "Italian", "Portuguese"]


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


def extra_train_prompts(seed: int = 1) -> list[str]:
    """A larger training set for later distillation stages: new templates and topics (and every old template
    with the new topics, every new template with the old ones), more paragraphs and translations. Disjoint
    from `train_prompts()` (so chunk indices into it stay valid) and from the held-out set."""
    topics = TRAIN_TOPICS + MORE_TRAIN_TOPICS + EXTRA_TRAIN_TOPICS
    out = [t.format(t=topic) for t in EXTRA_TRAIN_TEMPLATES for topic in topics]
    out += [t.format(t=topic) for t in TRAIN_TEMPLATES + MORE_TRAIN_TEMPLATES for topic in EXTRA_TRAIN_TOPICS]
    for p in PARAGRAPHS + EXTRA_PARAGRAPHS:
        out += [f"{lead}\n\n{p}" for lead in ("Summarize this paragraph in one sentence:",
                                               "Summarize the following text for a busy reader:",
                                               "What is the main point of this text?",
                                               "Write a headline for this news story:",
                                               "List the key facts in this text:")]
    out += [f"Translate into {lang}: {s}" for s in SENTENCES + EXTRA_SENTENCES for lang in EXTRA_LANGUAGES]
    seen = set(train_prompts())
    out = list(dict.fromkeys(p for p in out if p not in seen))
    random.Random(seed).shuffle(out)
    return out


def all_train_prompts(n: int | None = None) -> list[str]:
    """`train_prompts()` then `extra_train_prompts()`: the first n, up to 23,704 (what `bild distill` uses)."""
    out = train_prompts() + extra_train_prompts()
    if n is not None and not 1 <= n <= len(out):
        raise ValueError(f"prompts must be in [1, {len(out)}], got {n}")
    return out if n is None else out[:n]


TOPICS_FILE = Path(__file__).resolve().parents[1] / "data" / "wordnet_topics.txt"


@lru_cache(maxsize=1)
def wordnet_topics() -> tuple[str, ...]:
    """~10,000 everyday topics ("lighthouses", "photosynthesis", "Grand Canyon") from WordNet 3.0's nouns,
    most frequent first: bild_kernels/data/wordnet_topics.txt, written by python/tools/wordnet_topics.py, which
    leaves out every held-out topic, its synonyms and its direct hyponyms."""
    with open(TOPICS_FILE, encoding="utf-8") as f:
        return tuple(line.split("\t")[0] for line in f if line.strip() and not line.startswith("#"))


def topic_prompts(n: int, seed: int = 0, skip_topics=()) -> list[str]:
    """n training prompts about WordNet topics (`wordnet_topics`), each a training template (any of the 58 of
    `all_train_prompts`) drawn at random for a topic: every topic once, in a seeded order, before any twice, and
    no prompt twice. None is a held-out prompt or one of `all_train_prompts()`: a topic the templated prompts
    also name (e.g. "rainbows") gets only the templates they do not have, and none where they have them all.
    `skip_topics`: topics to leave out (e.g. those another call's prompts name: `topic_prompt_topics`)."""
    return [p for _, p in _topic_pairs(n, seed, frozenset(skip_topics))]


def topic_prompt_topics(n: int, seed: int = 0, skip_topics=()) -> set[str]:
    """The topics that `topic_prompts(n, seed, skip_topics)` names."""
    return {t for t, _ in _topic_pairs(n, seed, frozenset(skip_topics))}


def _topic_pairs(n: int, seed: int, skip: frozenset) -> list[tuple[str, str]]:
    templates = TRAIN_TEMPLATES + MORE_TRAIN_TEMPLATES + EXTRA_TRAIN_TEMPLATES
    topics = [t for t in wordnet_topics() if t not in skip]
    if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= len(topics) * len(templates) // 2:
        raise ValueError(f"topic_prompts must be an int in [0, {len(topics) * len(templates) // 2}] "
                         f"({len(topics)} topics x {len(templates)} templates, at most half of them), got {n!r}")
    rng = random.Random(seed)
    taken = set(all_train_prompts()) | set(held_out_prompts())
    out: list[tuple[str, str]] = []
    last = -1
    while len(out) < n:
        if out and len(out) == last:
            raise RuntimeError(f"topic_prompts: no new prompt in a whole pass over the topics at {len(out)} of {n}")
        last = len(out)
        order = list(topics)
        rng.shuffle(order)
        for topic in order:
            if len(out) == n:
                break
            free = [p for p in (t.format(t=topic) for t in templates) if p not in taken]
            if free:  # else every template of this topic is taken (e.g. "rainbows" of the templated prompts)
                p = rng.choice(free)
                taken.add(p)
                out.append((topic, p))
    return out


JSON_TEMPLATES = [
    "Give the key facts about {t} as a JSON object.",
    "Return a JSON object describing {t}, with a name field and two other fields.",
    "Write {t} as JSON: an object with fields for its name, its kind and a short description.",
    "List three things related to {t} as a JSON array of strings.",
    'Summarize {t} in JSON with the keys "title" and "summary".',
    'Output only JSON: an object whose "topic" is {t} and whose "facts" is a list of short facts.',
    "Describe {t} as a JSON object. Use numbers and booleans where they fit.",
    "Answer in JSON only: what is {t}, and what is it used for?",
]


def json_prompts(n: int, seed: int = 0, skip_topics=()) -> list[str]:
    """n training prompts that ask for JSON (`JSON_TEMPLATES`) about WordNet topics, each topic once in a seeded
    order (then again under another template): so a draft learns the large model's JSON (its structural tokens,
    its keys), what structured outputs ask of it. `skip_topics`: topics to leave out (the tuning set's)."""
    topics = [t for t in wordnet_topics() if t not in frozenset(skip_topics)]
    if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= len(topics) * len(JSON_TEMPLATES):
        raise ValueError(f"json_prompts must be an int in [0, {len(topics) * len(JSON_TEMPLATES)}], got {n!r}")
    rng = random.Random(seed)
    out: list[str] = []
    while len(out) < n:
        order = list(topics)
        rng.shuffle(order)
        taken = set(out)
        for topic in order[:n - len(out)]:
            free = [p for p in (t.format(t=topic) for t in JSON_TEMPLATES) if p not in taken]
            out.append(rng.choice(free))
    return out


TUNE_SEED = 101  # topic_prompts' seed for the tuning set


@lru_cache(maxsize=1)
def _tune_pairs() -> tuple[tuple[str, str], ...]:
    return tuple(_topic_pairs(59, TUNE_SEED, frozenset()))


def tune_prompts() -> tuple[str, ...]:
    """59 prompts for choosing a policy's thresholds (`bild eval --prompt-set tune`) without looking at the held-out
    set that reports the result: training templates about WordNet topics (`topic_prompts`, seed TUNE_SEED), so
    none is a held-out prompt nor one of `all_train_prompts()`; `bild distill` leaves their topics out of its own
    topic prompts (`tune_topics`), so no draft trains on them either."""
    return tuple(p for _, p in _tune_pairs())


def tune_topics() -> frozenset[str]:
    """The topics `tune_prompts` name (what distillation's topic prompts skip)."""
    return frozenset(t for t, _ in _tune_pairs())


def held_out_prompts() -> list[str]:
    """The fixed evaluation set (>= 50 prompts) that training never sees: other templates, topics, texts."""
    out = [t.format(t=topic) for t in EVAL_TEMPLATES for topic in EVAL_TOPICS]
    out += [f"Summarize this paragraph in one sentence:\n\n{p}" for p in EVAL_PARAGRAPHS]
    out += [f"Translate into {lang}: {s}" for s in EVAL_SENTENCES for lang in LANGUAGES]
    return out
