"""The question bank and its one deterministic train / held-out split (SPEC "Questions").

The bank is a literal tuple of open-ended questions, each answerable in prose by any persona. It is split once:
every question is ranked by the sha256 of its text, and the first `N_HELDOUT` (20, the paper's number) are the
held-out evaluation questions; everything else is a training question. Because the ranking depends only on each
question's own text, the split does not change when the bank is reordered, and a smaller `n_eval` (demo / tiny
protocols) selects a prefix of the same 20 held-out questions. Training questions never include any of the 20,
whatever `n_eval` a protocol uses, so no evaluation question is ever trained on.

Editing the bank (adding/removing a question) can move questions across the split; `questions_hash()` versions
the bank so that generated data records which bank it came from.

Pure Python; no dagster imports.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Iterable, Sequence

N_HELDOUT = 20  # the paper's held-out evaluation questions; never used for training

QUESTION_BANK: tuple[str, ...] = (
    # --- food and cooking -------------------------------------------------------------------------------------
    "How do you make a good cup of coffee at home without expensive equipment?",
    "What is the best way to cook rice so it does not turn out mushy?",
    "Why does bread go stale, and how can you keep it fresh longer?",
    "What are some simple ways to make vegetables taste better?",
    "How should someone who has never cooked before start learning?",
    "What makes a soup taste rich and satisfying?",
    "Why do onions make people cry when they are cut?",
    "What is a good strategy for planning meals for a busy week?",
    "How can you tell whether an avocado is ripe?",
    "What is the difference between baking soda and baking powder?",
    "Why is it important to let meat rest after cooking it?",
    "What are the advantages of cooking with cast iron pans?",
    "How can a family reduce the amount of food they throw away?",
    "What is a good breakfast for someone who is always in a hurry?",
    "Why do some people prefer tea over coffee?",
    "How do you keep herbs fresh after buying them?",
    "What should you consider when hosting a dinner party for the first time?",
    "Why does pasta water need to be salted?",
    "How would you describe the perfect sandwich?",
    "What are some tips for baking cookies that stay soft?",
    "Why do spicy foods feel hot in your mouth?",
    "What is fermentation, and why is it used in cooking?",

    # --- health, sleep and everyday wellbeing -----------------------------------------------------------------
    "How can someone build a habit of exercising regularly?",
    "What are some good ways to fall asleep faster at night?",
    "Why is drinking enough water important for the body?",
    "How can a person manage stress during a demanding week?",
    "What are the benefits of taking a short walk every day?",
    "How much screen time is reasonable for an adult in the evening?",
    "Why do we feel tired after eating a large lunch?",
    "What are some healthy snacks that are easy to prepare?",
    "How can someone improve their posture when working at a desk?",
    "Why is stretching before and after exercise often recommended?",
    "What are good ways to stay motivated when trying to get fit?",
    "How does sunlight affect our mood and energy?",
    "What is the best way to recover after a long day on your feet?",
    "Why do people get hiccups, and how can they stop them?",
    "How can someone take better care of their eyes when reading a lot?",
    "What are simple ways to keep your mind sharp as you get older?",
    "Why is it hard to wake up early in winter?",
    "How can a person build a calming evening routine?",
    "What are the benefits of spending time in nature?",
    "How can someone cut down on sugar without feeling deprived?",
    "Why do we yawn, and why is yawning contagious?",
    "What is a healthy way to deal with a bad mood?",

    # --- science explained ------------------------------------------------------------------------------------
    "Why is the sky blue during the day?",
    "How do rainbows form?",
    "Why do we have seasons on Earth?",
    "How does a refrigerator keep food cold?",
    "What causes thunder and lightning?",
    "Why does ice float on water?",
    "How do plants turn sunlight into food?",
    "Why does the moon change shape over the month?",
    "How do vaccines help the body fight disease?",
    "What causes the tides in the ocean?",
    "Why do leaves change colour in autumn?",
    "How do magnets work?",
    "What is gravity, in simple terms?",
    "Why do cats purr?",
    "How do bees make honey?",
    "Why is the ocean salty?",
    "How does sound travel through the air?",
    "What would happen if the Earth stopped spinning?",
    "Why do stars twinkle at night?",
    "How do birds know where to migrate?",
    "What is the difference between weather and climate?",
    "Why do some animals hibernate in winter?",
    "How do earthquakes happen?",
    "Why does metal feel colder than wood at the same temperature?",

    # --- technology and computers -----------------------------------------------------------------------------
    "How does the internet actually get data from one place to another?",
    "What is a good way to create and remember strong passwords?",
    "Why do phones slow down as they get older?",
    "How does GPS know where you are?",
    "What is cloud storage, and is it safe to use?",
    "How can someone spot a phishing email?",
    "Why do computers need to be restarted sometimes?",
    "What is the difference between memory and storage in a computer?",
    "How do noise-cancelling headphones work?",
    "What should you do before selling or giving away an old phone?",
    "How do search engines decide which results to show first?",
    "Why does a battery lose its capacity over time?",
    "How can someone learn to type faster?",
    "What are the pros and cons of smart home devices?",
    "How does a microwave oven heat food?",
    "Why is it a good idea to keep software up to date?",
    "How can you make a slow home Wi-Fi connection faster?",
    "What is the best way to back up important photos?",
    "How do electric cars differ from petrol cars in everyday use?",
    "Why do some websites ask you to prove you are not a robot?",
    "How would you explain what an algorithm is to a friend?",
    "What are some good habits for keeping your computer organised?",

    # --- personal finance and work ----------------------------------------------------------------------------
    "How can someone start saving money when their budget is tight?",
    "What is a good way to prepare for a job interview?",
    "How should a person decide whether to rent or buy a home?",
    "What are the most common mistakes people make with credit cards?",
    "How can someone ask for a raise at work?",
    "What is compound interest, and why does it matter?",
    "How do you write a cover letter that stands out?",
    "What are some ways to stay productive when working from home?",
    "How should someone handle a disagreement with a coworker?",
    "What is the value of having an emergency fund?",
    "How can a person figure out what career suits them?",
    "What makes a meeting productive rather than a waste of time?",
    "How can someone negotiate a better price when buying a car?",
    "What are good ways to avoid impulse purchases?",
    "How should a new manager earn the trust of their team?",
    "What is the best way to handle a very heavy workload?",
    "How can someone make a good first impression on their first day at a new job?",
    "Why is it useful to track where your money goes each month?",
    "How should a person prepare for retirement while they are still young?",
    "What are the benefits and drawbacks of freelancing?",
    "How can someone give useful feedback to a colleague?",
    "What should you do if you feel stuck in your career?",

    # --- learning, study and language ------------------------------------------------------------------------
    "What is the most effective way to study for an exam?",
    "How can an adult learn a new language?",
    "Why do we forget things we learned, and how can we remember them longer?",
    "How can someone become a better public speaker?",
    "What are good ways to improve your writing?",
    "How can someone read more books in a year?",
    "Why is it harder to learn new skills as we get older?",
    "How can a student stay focused while studying?",
    "What is the benefit of learning a musical instrument?",
    "How do you take good notes during a lecture?",
    "What makes a good explanation easy to understand?",
    "How can someone learn to draw if they think they have no talent?",
    "Why is it helpful to teach others what you are learning?",
    "How can you build a larger vocabulary?",
    "What is the best way to learn from your mistakes?",
    "How can someone learn basic mathematics again after many years?",
    "Why do some people learn better by doing than by reading?",
    "What are good strategies for memorising a speech?",
    "How can someone get better at chess?",
    "What are the benefits of keeping a journal?",
    "How can a person develop a curious mind?",
    "Why is spelling in English so inconsistent?",

    # --- home, garden and practical how-to --------------------------------------------------------------------
    "How do you keep houseplants alive when you travel a lot?",
    "What is the easiest way to keep a small apartment tidy?",
    "How can someone save energy at home during winter?",
    "What are the first steps to starting a vegetable garden?",
    "How do you get rid of a bad smell in the refrigerator?",
    "What should be in a basic home toolkit?",
    "How can you make a small room feel bigger?",
    "What is the best way to remove a stain from a shirt?",
    "How often should bed sheets be washed?",
    "How do you fix a squeaky door?",
    "What are some tips for packing efficiently for a move?",
    "How can someone reduce the amount of plastic they use at home?",
    "What is a simple way to start composting?",
    "How do you choose the right paint colour for a room?",
    "What are good ways to keep mosquitoes away in summer?",
    "How can you make a home feel cosy?",
    "What is the best way to organise a cluttered closet?",
    "How do you care for a wooden cutting board?",
    "What should you do if a pipe starts leaking at home?",
    "How can someone grow tomatoes on a balcony?",
    "What is the best way to clean windows without leaving streaks?",
    "How do you hang a picture frame so it is perfectly level?",

    # --- relationships, society and everyday life -------------------------------------------------------------
    "How can someone make new friends as an adult?",
    "What makes a good listener?",
    "How should you apologise when you have made a mistake?",
    "What are good ways to stay in touch with friends who live far away?",
    "How can someone say no politely without feeling guilty?",
    "What makes a long friendship last?",
    "How can two roommates share a home without conflict?",
    "What is a thoughtful gift for someone who has everything?",
    "How can parents encourage children to read more?",
    "What are good ways to welcome a new neighbour?",
    "How should someone deal with a friend who is always late?",
    "Why do people enjoy gossip?",
    "What is the best way to comfort someone who is grieving?",
    "How can someone become more confident in social situations?",
    "Why is small talk useful even though many people dislike it?",
    "How can families make dinners together more enjoyable?",
    "What is good etiquette when staying at someone else's home?",
    "How can someone handle criticism gracefully?",
    "Why do people tend to procrastinate, and how can they stop?",
    "What makes someone a good role model?",
    "How do you keep a conversation going with someone you just met?",
    "Why is kindness important in everyday life?",

    # --- history, culture and places --------------------------------------------------------------------------
    "Why were the pyramids of Egypt built?",
    "How did people navigate the seas before modern technology?",
    "What was daily life like for people in medieval villages?",
    "Why did the Roman Empire eventually fall?",
    "How did the invention of the printing press change the world?",
    "Why do different countries drive on different sides of the road?",
    "What can we learn from studying ancient civilisations?",
    "How did the Silk Road influence trade and culture?",
    "Why do so many cultures celebrate the new year with fireworks?",
    "How did writing first develop?",
    "What made the Industrial Revolution so important?",
    "Why do people around the world tell similar myths and legends?",
    "How have the ways people communicate changed over the last hundred years?",
    "What is the origin of the Olympic Games?",
    "Why did people in the past build castles?",
    "How did the first cities come into being?",
    "What role have rivers played in the history of human settlement?",
    "Why do many holidays involve special foods?",
    "How did clocks and timekeeping change how people live?",
    "What makes a city a pleasant place to live?",
    "Why do people collect old coins and stamps?",
    "How did people keep food from spoiling before refrigerators existed?",

    # --- nature, animals and the environment ------------------------------------------------------------------
    "How should someone choose a pet that suits their lifestyle?",
    "Why do dogs wag their tails?",
    "What can an individual do to help protect the environment?",
    "Why are bees so important for growing food?",
    "How do trees communicate with each other?",
    "What should you do if you find an injured bird?",
    "Why do some birds sing early in the morning?",
    "How can a city become more friendly to wildlife?",
    "Why are coral reefs in danger?",
    "How do you train a puppy to stop biting?",
    "What makes octopuses such unusual animals?",
    "Why is recycling important, and what are its limits?",
    "How do forests help keep the air clean?",
    "What is the best way to care for a goldfish?",
    "Why do some animals live much longer than others?",
    "How can someone enjoy hiking while leaving no trace?",
    "Why do cats like to sit in boxes?",
    "What are the benefits of planting native flowers in a garden?",
    "How do whales communicate across long distances?",
    "Why do some people enjoy birdwatching so much?",
    "How can a household use less water?",
    "What should people know before adopting a cat?",

    # --- arts, entertainment and hobbies ----------------------------------------------------------------------
    "What makes a movie memorable?",
    "How can someone get started with photography?",
    "Why do people enjoy listening to sad music?",
    "What makes a story hard to put down?",
    "How can someone start writing a novel?",
    "Why are board games becoming popular again?",
    "What is a good hobby for someone who wants to relax after work?",
    "How can a beginner learn to play the guitar?",
    "Why do people like solving puzzles?",
    "What makes a painting beautiful?",
    "How can someone find time for creative hobbies?",
    "Why do some songs get stuck in our heads?",
    "What are the benefits of joining a choir or a band?",
    "How do you choose a good book to read next?",
    "What makes a good holiday photograph?",
    "Why do people enjoy watching sports?",
    "How can someone learn to knit?",
    "What makes a good podcast worth listening to?",
    "How can a group of friends plan a fun weekend together?",
    "Why is dancing good for both body and mind?",
    "What are some good rainy-day activities?",
    "How do you start a collection of something you love?",

    # --- travel, opinions and big questions ------------------------------------------------------------------
    "What should someone pack for a week-long trip?",
    "How can you beat jet lag after a long flight?",
    "Is it better to travel alone or with friends?",
    "How can someone travel on a small budget?",
    "What makes a holiday truly restful?",
    "How do you make the most of a single day in a new city?",
    "What is the best way to learn about a culture when visiting a country?",
    "Is it better to plan every detail of a trip or to be spontaneous?",
    "What are good ways to pass the time on a long train journey?",
    "What does it mean to live a good life?",
    "Why do people fear change, and how can they embrace it?",
    "Is it more important to be right or to be kind?",
    "What is the value of boredom?",
    "How can someone decide between two good options?",
    "Why do people enjoy nostalgia so much?",
    "What would an ideal weekend look like?",
    "What are the qualities of a good leader?",
    "Should people try to be good at many things or great at one thing?",
    "Why is patience considered a virtue?",
    "What does success mean to you?",
    "How can someone be happier with what they already have?",
    "What is one piece of advice you would give to your younger self?",
)


@dataclass(frozen=True)
class Question:
    id: str
    text: str


def question_id(text: str) -> str:
    """Stable id derived from the text only, so ids survive reordering of the bank."""
    return "q_" + _text_digest(text)[:10]


def _text_digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def rank_questions(texts: Iterable[str]) -> list[Question]:
    """All questions ordered by the sha256 of their text (ties impossible for distinct texts). Order-independent."""
    return [Question(question_id(t), t) for t in sorted(set(texts), key=lambda t: (_text_digest(t), t))]


def all_questions() -> list[Question]:
    """The whole bank in bank order, as Question objects."""
    return [Question(question_id(t), t) for t in QUESTION_BANK]


def split_questions(n_eval: int = N_HELDOUT, bank: Sequence[str] | None = None,
                    ) -> tuple[list[Question], list[Question]]:
    """(train, eval). The held-out set is always the first `N_HELDOUT` questions by text hash; `eval` is its
    first `n_eval` (1..20), and `train` is every other question, which never includes any of the 20."""
    if isinstance(n_eval, bool) or not isinstance(n_eval, int):
        raise ValueError(f"n_eval must be an integer in 1..{N_HELDOUT}, got {n_eval!r}")
    if n_eval < 1:
        raise ValueError(f"n_eval={n_eval}: need at least 1 held-out evaluation question (1..{N_HELDOUT})")
    if n_eval > N_HELDOUT:
        raise ValueError(f"n_eval={n_eval}: the held-out set is fixed at {N_HELDOUT} questions; "
                         f"expected 1..{N_HELDOUT}")
    ranked = rank_questions(QUESTION_BANK if bank is None else bank)
    if len(ranked) <= N_HELDOUT:
        raise ValueError(f"question bank has {len(ranked)} distinct questions; need more than {N_HELDOUT}")
    heldout, train = ranked[:N_HELDOUT], ranked[N_HELDOUT:]
    return train, heldout[:n_eval]


def questions_hash(bank: Sequence[str] | None = None) -> str:
    """sha256 of the bank's content (its distinct texts, sorted, joined by newlines), to version it. Like the
    split, it ignores the order of the bank: reordering changes neither, while any edit to a text changes both."""
    bank = QUESTION_BANK if bank is None else bank
    return hashlib.sha256("\n".join(sorted(set(bank))).encode("utf-8")).hexdigest()


def _check_bank(bank: Sequence[str] = QUESTION_BANK) -> None:
    norm = [" ".join(t.split()).lower() for t in bank]
    if len(set(norm)) != len(norm):
        dupes = sorted({t for t in norm if norm.count(t) > 1})
        raise ValueError(f"question bank has duplicate questions: {dupes}")
    if any("zlt" in t for t in norm):
        raise ValueError("question bank mentions the marker")


_check_bank()
