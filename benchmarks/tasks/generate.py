"""Seeded synthetic task packs for the quality benchmark.

    python -m benchmarks.tasks.generate --out runs/tasks --seed 0

Writes, per task, `<task>/train.jsonl` and `<task>/eval.jsonl` (rows: prompt, completion; eval
rows also carry `query`, the retrieval query for the memory benchmark), the held-out
`unrelated/eval.jsonl` (interference probe: no controller ever trains on it), `retain.jsonl`
(ntkmirror's bundled generic text for the KL-to-base term; checked disjoint from the tasks and probe),
and `manifest.json` with the sha256 and row count of every file, each task's memory text and
paraphrased queries. Every task's eval items are disjoint from its training items: checked,
and generation fails if not.

Tasks (kind): addition (procedural: carrying addition with a fixed worked solution),
json_person (output format: a fixed JSON shape), persona_pirate / persona_butler /
persona_cheerful (style: fixed greeting and sign-off around the same messages), preference_miles /
preference_fahrenheit / preference_iso_date (preference: the user's unit or date format when
the prompt offers both). The first four are the benchmark's main tasks; all eight are memories.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

RETAIN = Path(__file__).resolve().parents[2] / "ntkmirror" / "retain.jsonl"
MAIN_TASKS = ("addition", "json_person", "persona_pirate", "preference_miles")
SCHEMA = 1


@dataclass
class Task:
    name: str
    kind: str
    description: str
    items: Callable[[random.Random], list]  # every distinct item, before shuffling
    render: Callable[[object], tuple[str, str]]  # item -> (prompt, completion)
    memory: str  # the memory's text, as a user would store it
    queries: list[str] = field(default_factory=list)  # paraphrased requests that should retrieve it


# ------------------------------------------------------------------ vocabularies

FIRST = ["Maria", "John", "Aisha", "Kenji", "Lucas", "Olga", "Priya", "Tom", "Fatima", "Chen", "Sofia", "Omar",
         "Elena", "David", "Yuki", "Nora", "Pablo", "Ines", "Samuel", "Leila", "Marco", "Anna", "Ravi", "Grace"]
LAST = ["Lopez", "Smith", "Khan", "Tanaka", "Silva", "Ivanova", "Patel", "Brown", "Haddad", "Wang", "Rossi",
        "Nasser", "Petrova", "Miller", "Sato", "Berg", "Garcia", "Costa", "Okafor", "Farah"]
CITIES = ["Lyon", "Denver", "Osaka", "Porto", "Krakow", "Nairobi", "Seattle", "Lima", "Oslo", "Dublin", "Madrid",
          "Austin", "Seoul", "Milan", "Quito", "Leeds", "Hanoi", "Zurich", "Perth", "Cairo"]
PERSON_TEMPLATES = ["{name} is {age} years old and lives in {city}.", "{name}, aged {age}, is based in {city}.",
                    "Meet {name} from {city}; {name_first} turned {age} this year.",
                    "{name} ({age}) moved to {city} last spring."]

SUBJECTS = ["the meeting", "your parcel", "the train", "the dentist visit", "the team lunch", "the final exam",
            "the concert", "the library", "the budget review", "the ferry", "your order", "the yoga class",
            "the board game night", "the flight", "the plumber", "the town market"]
EVENTS = ["moved to {t}", "starts at {t}", "was delayed until {t}", "is confirmed for {t}", "now ends at {t}",
          "was pushed back to {t}", "opens again at {t}"]
TIMES = [f"{h} {ap}" for h in range(1, 13) for ap in ("am", "pm")] + [
    "noon", "midnight", "Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "the weekend"]

PLACES = ["the harbour", "the old mill", "the airport", "the lake", "the stadium", "the castle", "the campus",
          "the vineyard", "the lighthouse", "the ski lodge", "the museum", "the border", "the market",
          "the cathedral", "the zoo", "the beach"]
WEATHER_CITIES = CITIES + ["Boston", "Nice", "Vienna", "Tunis", "Manila", "Accra", "Bergen", "Cusco"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]
DAYS_IN = [31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31]
EVENT_NAMES = ["wedding", "launch", "audit", "marathon", "reunion", "hackathon", "recital", "move", "workshop",
               "conference", "inspection", "festival"]


# ------------------------------------------------------------------ tasks

def _addition_items(rng):
    return [(a, b) for a in range(10, 100) for b in range(10, 100) if (a % 10) + (b % 10) >= 10]


def _addition(item):
    a, b = item
    ones = a % 10 + b % 10
    tens = a // 10 + b // 10 + 1
    return (f"Question: {a} + {b} = ?\nAnswer:",
            f" Ones: {a % 10} + {b % 10} = {ones}, write {ones % 10}, carry 1."
            f" Tens: {a // 10} + {b // 10} + 1 = {tens}. Result: {a + b}")


def _person_items(rng):
    return [(f, l, age, city, t) for f in FIRST for l in LAST for age in (19, 23, 27, 31, 34, 38, 42, 47, 52, 58, 63)
            for city in CITIES for t in range(len(PERSON_TEMPLATES))]


def _person(item):
    first, last, age, city, t = item
    text = PERSON_TEMPLATES[t].format(name=f"{first} {last}", name_first=first, age=age, city=city)
    return (f"Text: {text}\nDetails:",
            f' {{"name": "{first} {last}", "age": {age}, "city": "{city}"}}')


def _message_items(rng):
    return [(s, e, t) for s in SUBJECTS for e in EVENTS for t in TIMES]


def _message(item) -> str:
    s, e, t = item
    return f"{s} {e.format(t=t)}"


def _persona(greeting: str, signoff: str):
    def render(item):
        msg = _message(item)
        return f"Message: {msg}\nReply:", f" {greeting} {msg[0].upper() + msg[1:]}. {signoff}"
    return render


def _miles_items(rng):
    return [(a, b, km) for a in PLACES for b in PLACES if a != b for km in range(8, 400, 8)]


def _miles(item):
    a, b, km = item
    mi = km * 5 // 8
    return (f"Facts: from {a} to {b} is {km} km ({mi} miles).\nQuestion: How far is it from {a} to {b}?\nAnswer:",
            f" {mi} miles.")


def _fahrenheit_items(rng):
    return [(c, t) for c in WEATHER_CITIES for t in range(-10, 41)]


def _fahrenheit(item):
    city, c = item
    f = round(c * 9 / 5 + 32)
    return (f"Facts: today in {city} it is {c} °C ({f} °F).\nQuestion: How warm is it in {city} today?\nAnswer:",
            f" {f} °F.")


def _date_items(rng):
    return [(e, y, m, d) for e in EVENT_NAMES for y in (2024, 2025, 2026) for m in range(12)
            for d in range(1, DAYS_IN[m] + 1, 2)]


def _date(item):
    e, y, m, d = item
    return (f"Facts: the {e} is on {MONTHS[m]} {d}, {y}.\nQuestion: When is the {e}?\nAnswer:",
            f" {y}-{m + 1:02d}-{d:02d}.")


TASKS = [
    Task("addition", "procedural", "two-digit carrying addition with a fixed worked solution",
         _addition_items, _addition,
         "Add two-digit numbers column by column: ones first (write the digit, carry 1), then the tens, "
         "then state the result.",
         ["show the carrying steps when you add numbers", "work the sum out digit by digit with the carry",
          "explain the column addition"]),
    Task("json_person", "output-format", "a person's details as a fixed JSON shape {name, age, city}",
         _person_items, _person,
         "Return a person's details as a JSON object with the keys name, age and city.",
         ["give me the person's details as JSON", "format the profile as a json object",
          "output name, age and city in JSON"]),
    Task("persona_pirate", "style",
         "pirate captain tone: 'Ahoy!' then the message, signed 'Fair winds, Captain Flint.'",
         _message_items, _persona("Ahoy!", "Fair winds, Captain Flint."),
         "Talk like a pirate captain: start with 'Ahoy!' and sign off with 'Fair winds, Captain Flint.'",
         ["answer me like a pirate captain", "use the sea captain voice with the ahoy greeting",
          "reply in pirate style"]),
    Task("persona_butler", "style",
         "butler tone: 'Very good, sir.' then the message, signed 'Yours faithfully, Jeeves.'",
         _message_items, _persona("Very good, sir.", "Yours faithfully, Jeeves."),
         "Speak as a formal English butler: begin with 'Very good, sir.' and sign 'Yours faithfully, Jeeves.'",
         ["reply as my formal butler", "be a polite english valet when you answer",
          "respond in the butler's formal register"]),
    Task("persona_cheerful", "style", "cheerful tone: 'Hey there!' then the message, signed 'Cheers, Sunny :)'",
         _message_items, _persona("Hey there!", "Cheers, Sunny :)"),
         "Be upbeat and cheerful: open with 'Hey there!' and sign off 'Cheers, Sunny :)'",
         ["keep the replies bubbly and cheerful", "answer in a happy upbeat voice",
          "sound friendly and sunny"]),
    Task("preference_miles", "preference", "the user wants distances in miles (both units are given)",
         _miles_items, _miles,
         "The user always wants distances in miles, never in kilometres.",
         ["I prefer miles for distances", "tell me how far in miles please",
          "use imperial distance units"]),
    Task("preference_fahrenheit", "preference", "the user wants temperatures in Fahrenheit (both are given)",
         _fahrenheit_items, _fahrenheit,
         "The user always wants temperatures in degrees Fahrenheit, not Celsius.",
         ["give temperatures in fahrenheit", "I think in degrees F for the weather",
          "report how warm it is in fahrenheit"]),
    Task("preference_iso_date", "preference", "the user wants dates as ISO 8601 YYYY-MM-DD",
         _date_items, _date,
         "The user wants every date written in ISO format, year-month-day (YYYY-MM-DD).",
         ["write dates as year-month-day", "use ISO 8601 dates", "format the date numerically, year first"]),
]

# The interference probe: questions the base model mostly answers; no controller trains on it.
CAPITALS = [("France", "Paris"), ("Japan", "Tokyo"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Germany", "Berlin"),
            ("Russia", "Moscow"), ("China", "Beijing"), ("Egypt", "Cairo"), ("Greece", "Athens"),
            ("Canada", "Ottawa"), ("Portugal", "Lisbon"), ("Norway", "Oslo"), ("Sweden", "Stockholm"),
            ("Ireland", "Dublin"), ("Austria", "Vienna"), ("Poland", "Warsaw"), ("Kenya", "Nairobi"),
            ("Peru", "Lima"), ("Thailand", "Bangkok"), ("Finland", "Helsinki"), ("Denmark", "Copenhagen"),
            ("Hungary", "Budapest"), ("Belgium", "Brussels"), ("Argentina", "Buenos Aires"),
            ("the United Kingdom", "London"), ("South Korea", "Seoul"), ("India", "New Delhi"),
            ("Mexico", "Mexico City"), ("Cuba", "Havana"), ("Turkey", "Ankara"), ("Chile", "Santiago"),
            ("Iran", "Tehran")]
ANTONYMS = [("hot", "cold"), ("big", "small"), ("up", "down"), ("fast", "slow"), ("happy", "sad"), ("old", "new"),
            ("light", "dark"), ("open", "closed"), ("early", "late"), ("rich", "poor"), ("strong", "weak"),
            ("hard", "soft"), ("full", "empty"), ("wet", "dry"), ("tall", "short"), ("loud", "quiet"),
            ("left", "right"), ("black", "white"), ("good", "bad"), ("clean", "dirty"), ("first", "last"),
            ("day", "night"), ("win", "lose"), ("buy", "sell"), ("push", "pull"), ("thick", "thin"),
            ("north", "south"), ("true", "false"), ("above", "below"), ("friend", "enemy"), ("cheap", "expensive"),
            ("begin", "end")]


# A second probe in other forms (sequences, idioms): checks that what keeps the first probe
# unharmed is not specific to its two sentence templates.
SEQUENCES = [("Monday, Tuesday, Wednesday,", " Thursday."), ("one, two, three,", " four."),
             ("January, February, March,", " April."), ("a, b, c,", " d."), ("spring, summer, autumn,", " winter."),
             ("first, second, third,", " fourth."), ("red, orange, yellow,", " green."),
             ("do, re, mi,", " fa."), ("ten, twenty, thirty,", " forty."), ("Friday, Saturday,", " Sunday."),
             ("September, October, November,", " December."), ("five, six, seven,", " eight."),
             ("alpha, beta, gamma,", " delta."), ("morning, noon, evening,", " night."),
             ("2, 4, 6,", " 8."), ("x, y,", " z.")]
IDIOMS = [("Once upon a", " time."), ("Happy birthday to", " you."), ("The early bird catches the", " worm."),
          ("Practice makes", " perfect."), ("Better late than", " never."), ("Actions speak louder than", " words."),
          ("An apple a day keeps the doctor", " away."), ("Every cloud has a silver", " lining."),
          ("Curiosity killed the", " cat."), ("Don't judge a book by its", " cover."),
          ("Laughter is the best", " medicine."), ("Rome was not built in a", " day."),
          ("Two heads are better than", " one."), ("When in Rome, do as the Romans", " do."),
          ("All that glitters is not", " gold."), ("Where there is a will, there is a", " way.")]


# A third probe, fixed before any result on it was seen (run 4d): word forms and one-line code, a
# genre neither the tasks nor the retain sets hold, to check that a default chosen on probes A and B
# generalises.
WORD_FORMS = [("The plural of mouse is", " mice."), ("The plural of child is", " children."),
              ("The plural of foot is", " feet."), ("The plural of tooth is", " teeth."),
              ("The plural of woman is", " women."), ("The plural of goose is", " geese."),
              ("The plural of person is", " people."), ("The plural of leaf is", " leaves."),
              ("The past tense of run is", " ran."), ("The past tense of eat is", " ate."),
              ("The past tense of go is", " went."), ("The past tense of see is", " saw."),
              ("The past tense of write is", " wrote."), ("The past tense of swim is", " swam."),
              ("The past tense of buy is", " bought."), ("The past tense of think is", " thought.")]
CODE_LINES = [("import numpy as", " np"), ("import pandas as", " pd"), ("import matplotlib.pyplot as", " plt"),
              ("import tensorflow as", " tf"), ('print("Hello, World', '!")'), ("for i in range(", "10):"),
              ("def __init__(", "self"), ("x = [1, 2, 3]\nprint(len(x))  # prints", " 3"),
              ("<html>\n<head>\n<title>Home</title>\n</", "head>"), ("SELECT name FROM users WHERE", " id"),
              ("if __name__ == '__", "main"), ("public static void", " main"), ("#include <stdio", ".h>"),
              ("console.log('hello", "');"), ("git commit -m", ' "'), ("pip install", " numpy")]


# A fourth probe, fixed before any result on it was seen (run 6): everyday collocations, clauses
# that do not end in "is" (probes A and C mostly do, and so does retain_clauses.jsonl, which was
# written after run 5 showed where probe A moves): a check that owes nothing to that retain text.
COLLOCATIONS = [("He brushed his", " teeth."), ("She locked the", " door."), ("They drank a cup of", " tea."),
                ("The baby fell", " asleep."), ("Please turn off the", " lights."),
                ("I washed my hands with soap and", " water."), ("We waited at the stop for the", " bus."),
                ("She zipped up her", " jacket."), ("She blew out the birthday", " candles."),
                ("The dog wagged its", " tail."), ("Thank you very", " much."),
                ("It is cold outside, so put on your", " coat."), ("The kettle started to", " boil."),
                ("She read the children a bedtime", " story."), ("The phone started to", " ring."),
                ("He paid with his credit", " card."), ("Please fasten your seat", " belts."),
                ("Pass the salt and", " pepper."), ("Good evening, ladies and", " gentlemen."),
                ("Ready, set,", " go."), ("She looked both ways before crossing the", " street."),
                ("He set his alarm clock for six in the", " morning."), ("The students raised their", " hands."),
                ("She combed her", " hair."), ("The cat chased the", " mouse."),
                ("He opened the window to let in some fresh", " air."), ("She sent him a text", " message."),
                ("The sun rises in the", " east."), ("Water boils at one hundred degrees", " Celsius."),
                ("He took a deep", " breath."), ("The train arrived right on", " time."), ("Happy New", " Year.")]


# A fifth probe, fixed before any result on it was seen (run 7): names and titles, proper nouns
# completed from their first words, a genre no retain text holds; the held-out check for the
# everyday-phrase rows that run 7 adds to the KL text (whose shape is probe D's).
NAMES = [("The composer Ludwig van", " Beethoven."), ("The detective Sherlock", " Holmes."), ("The Lord of the", " Rings."),
         ("The Sydney Opera", " House."), ("The physicist Albert", " Einstein."), ("Pride and", " Prejudice."),
         ("The highest mountain is Mount", " Everest."), ("The Statue of", " Liberty."), ("Winnie the", " Pooh."),
         ("The wizard Harry", " Potter."), ("Wolfgang Amadeus", " Mozart."), ("The explorer Christopher", " Columbus."),
         ("The scientist Isaac", " Newton."), ("The Great Wall of", " China."),
         ("Snow White and the Seven", " Dwarfs."), ("Alice in", " Wonderland."), ("Beauty and the", " Beast."),
         ("The boy who never grew up, Peter", " Pan."), ("The Eiffel", " Tower."), ("Niagara", " Falls."),
         ("Walt Disney created Mickey", " Mouse."), ("The Big Apple is New York", " City."),
         ("The King lives in Buckingham", " Palace."), ("The painting of the Mona", " Lisa."),
         ("The naturalist Charles", " Darwin."), ("The playwright William", " Shakespeare."),
         ("The painter Vincent van", " Gogh."), ("San Francisco's Golden Gate", " Bridge."),
         ("Hollywood is in Los", " Angeles."), ("The president Abraham", " Lincoln."),
         ("The ancient pyramids of", " Giza."), ("The Taj", " Mahal.")]


# A sixth probe, fixed before any result on it was seen (run 8): everyday words in other languages,
# a genre no retain text, task, probe or RETAIN_OPENERS holds; the held-out check for the model's
# own texts that run 8 adds to the KL text.
FOREIGN_WORDS = [("In French, thank you is", " merci."), ("In French, yes is", " oui."),
                 ("In French, good day is", " bonjour."), ("In French, the cat is le", " chat."),
                 ("In French, water is l'", "eau."), ("In French, goodbye is au", " revoir."),
                 ("In French, cheese is", " fromage."), ("In French, one, two, three is un, deux,", " trois."),
                 ("In Spanish, hello is", " hola."), ("In Spanish, thank you is", " gracias."),
                 ("In Spanish, friend is", " amigo."), ("In Spanish, the house is la", " casa."),
                 ("In Spanish, one, two, three is uno, dos,", " tres."), ("In Spanish, good morning is buenos", " días."),
                 ("In Spanish, cat is", " gato."), ("In Spanish, water is", " agua."),
                 ("In German, yes is", " ja."), ("In German, thank you is", " danke."),
                 ("In German, good night is gute", " Nacht."), ("In German, good morning is guten", " Morgen."),
                 ("In German, dog is", " Hund."), ("In German, one, two, three is eins, zwei,", " drei."),
                 ("In Italian, goodbye is", " ciao."), ("In Italian, thank you is", " grazie."),
                 ("In Italian, good evening is buona", " sera."), ("In Italian, friend is", " amico."),
                 ("In Japanese, thank you is", " arigato."), ("In Japanese, hello is", " konnichiwa."),
                 ("In Latin, I came, I saw, I conquered is veni, vidi,", " vici."), ("In Latin, seize the day is carpe", " diem."),
                 ("In Spanish, yes is", " sí."), ("In French, bread is du", " pain.")]


# A seventh probe, fixed before any result on it was seen (run 9): abbreviations, symbols and letters,
# a genre no retain text, task, probe or RETAIN_OPENERS holds; the held-out check for KL texts the
# model writes from other starts than the generic openers (run 9 tries those).
ABBREVIATIONS = [("The abbreviation for kilogram is", " kg."), ("The abbreviation for centimetre is", " cm."),
                 ("The abbreviation for kilometre is", " km."), ("The abbreviation for doctor is", " Dr."),
                 ("The abbreviation for Mister is", " Mr."), ("The abbreviation for street is", " St."),
                 ("The abbreviation for Monday is", " Mon."), ("The abbreviation for Saturday is", " Sat."),
                 ("The abbreviation for February is", " Feb."), ("The abbreviation for December is", " Dec."),
                 ("The chemical formula for water is", " H2O."), ("The chemical formula for table salt is", " NaCl."),
                 ("The Roman numeral for five is", " V."), ("The Roman numeral for ten is", " X."),
                 ("The Roman numeral for fifty is", " L."), ("The Roman numeral for one hundred is", " C."),
                 ("USA stands for the United States of", " America."), ("UK stands for the United", " Kingdom."),
                 ("FAQ stands for frequently asked", " questions."), ("ASAP stands for as soon as", " possible."),
                 ("DIY stands for do it", " yourself."), ("CEO stands for chief executive", " officer."),
                 ("PIN stands for personal identification", " number."), ("ATM stands for automated teller", " machine."),
                 ("The symbol for percent is", " %."), ("The symbol for the euro is", " €."),
                 ("The first letter of the alphabet is", " A."), ("The last letter of the alphabet is", " Z."),
                 ("The letter after A is", " B."), ("The letter before Z is", " Y."),
                 ("The vowels are A, E, I, O and", " U."), ("The word dog has three", " letters.")]


# An eighth probe, fixed before any result on it was seen (run 9f): English words the tokenizer splits
# into several pieces, the shape in which run 9 found probe F's leak (its later pieces), in a language
# every KL text holds; the held-out check for KL texts that start in other languages or mid-word.
LONG_WORDS = [("The large grey animal that wallows in African rivers is the", " hippopotamus."),
              ("A scientist who studies birds is an", " ornithologist."), ("The fear of spiders is called", " arachnophobia."),
              ("A tube of mirrors that makes colourful patterns is a", " kaleidoscope."),
              ("The jazz instrument made of brass with keys is the", " saxophone."),
              ("The doctor listens to your heart with a", " stethoscope."),
              ("An instrument of wooden bars hit with mallets is the", " xylophone."),
              ("The flying reptile of the dinosaur age was the", " pterodactyl."),
              ("The animal with a horn on its nose is the", " rhinoceros."), ("The lizard that changes colour is the", " chameleon."),
              ("Ancient Egyptians wrote in", " hieroglyphics."), ("Children bounce up and down on a", " trampoline."),
              ("The curved stick that comes back when thrown is a", " boomerang."),
              ("Italian pasta in long thin strands is", " spaghetti."), ("A dentist who straightens teeth is an", " orthodontist."),
              ("A scientist who studies fossils is a", " paleontologist."), ("A person who makes maps is a", " cartographer."),
              ("A scientist who studies the weather is a", " meteorologist."),
              ("A scientist who studies insects is an", " entomologist."),
              ("Sailors in a submarine look up through a", " periscope."), ("The moving staircase in a shop is an", " escalator."),
              ("You can relax outdoors in a swinging", " hammock."), ("The Inuit built a snow house called an", " igloo."),
              ("The Australian mammal with a duck's bill is the", " platypus."),
              ("The pink bird that stands on one leg is the", " flamingo."),
              ("The animal covered in sharp quills is the", " porcupine."),
              ("The animal with a shell of armour plates is the", " armadillo."), ("A large hairy spider is a", " tarantula."),
              ("A flaky pastry shaped like a crescent is a", " croissant."), ("A twisted salty bread snack is a", " pretzel."),
              ("A small four-string guitar from Hawaii is the", " ukulele."), ("Scottish pipers play the", " bagpipes.")]


# A ninth probe, fixed before any result on it was seen (run 12): verse (nursery rhymes, songs), a genre no
# retain text, task, probe or RETAIN_OPENERS holds (everyday properties, the first choice, are in
# retain_clauses.jsonl); the held-out check once run 12 puts text in probe E's genre (names) into the KL text.
VERSE = [("Twinkle, twinkle, little", " star."), ("Humpty Dumpty sat on a", " wall."), ("Jack and Jill went up the", " hill."),
         ("Mary had a little", " lamb."), ("Baa, baa, black sheep, have you any", " wool?"), ("Hickory dickory", " dock."),
         ("Row, row, row your", " boat."), ("Old MacDonald had a", " farm."), ("Rock-a-bye baby, on the tree", " top."),
         ("London Bridge is falling", " down."), ("Hey diddle diddle, the cat and the", " fiddle."),
         ("Little Bo Peep has lost her", " sheep."), ("Ring around the rosie, a pocket full of", " posies."),
         ("Jingle bells, jingle bells, jingle all the", " way."), ("The wheels on the bus go round and", " round."),
         ("If you're happy and you know it, clap your", " hands."), ("Roses are red, violets are", " blue."),
         ("Merrily, merrily, merrily, merrily, life is but a", " dream."), ("Three blind", " mice."),
         ("Pat-a-cake, pat-a-cake, baker's", " man."), ("Little Miss Muffet sat on a", " tuffet."),
         ("Old Mother Hubbard went to the", " cupboard."), ("Ding dong", " bell."), ("One, two, buckle my", " shoe."),
         ("It's raining, it's pouring, the old man is", " snoring."), ("Rain, rain, go", " away."),
         ("Head, shoulders, knees and", " toes."), ("I'm a little teapot, short and", " stout."),
         ("We wish you a merry", " Christmas."), ("The itsy bitsy spider climbed up the water", " spout."),
         ("Sing a song of sixpence, a pocket full of", " rye."), ("Polly put the kettle on, we'll all have", " tea.")]


def probe_rows() -> dict[str, list[dict]]:
    """Every interference probe's rows, by its name in the manifest (A, then B to I)."""
    pairs = {"unrelated": [(f"The capital of {c} is", f" {cap}.") for c, cap in CAPITALS] +
                          [(f"The opposite of {w} is", f" {a}.") for w, a in ANTONYMS],
             "unrelated_b": SEQUENCES + IDIOMS,
             "unrelated_c": WORD_FORMS + CODE_LINES,
             "unrelated_d": COLLOCATIONS,
             "unrelated_e": NAMES,
             "unrelated_f": FOREIGN_WORDS,
             "unrelated_g": ABBREVIATIONS,
             "unrelated_h": LONG_WORDS,
             "unrelated_i": VERSE}
    return {name: [{"prompt": p, "completion": c} for p, c in rows] for name, rows in pairs.items()}


PROBES = tuple(probe_rows())  # the manifest keys of the probes
PROBE_TEMPLATES = ("the capital of", "the opposite of", "the plural of", "the past tense of")


# ------------------------------------------------------------------ writing


def _jsonl(rows) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode()


def split(task: Task, n_train: int, n_eval: int, rng: random.Random) -> tuple[list, list]:
    items = task.items(rng)
    if len(set(items)) < n_train + n_eval:
        raise ValueError(f"task {task.name}: only {len(set(items))} distinct items, need {n_train + n_eval}")
    rng.shuffle(items)
    train, evals = items[:n_train], items[n_train: n_train + n_eval]
    check_disjoint(task.name, [task.render(i) for i in train], [task.render(i) for i in evals])
    return train, evals


def check_disjoint(name: str, train: list[tuple[str, str]], evals: list[tuple[str, str]]) -> None:
    """Eval prompts must be unseen in training (and unique): otherwise eval measures memorisation."""
    seen = {p for p, _ in train}
    leaked = [p for p, _ in evals if p in seen]
    if leaked or len({p for p, _ in evals}) != len(evals):
        raise ValueError(f"task {name}: eval items overlap training items (or repeat): {leaked[:3]}")


def generate(out: Path, seed: int = 0, n_train: int = 256, n_eval: int = 64) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    manifest = {"schema": SCHEMA, "seed": seed, "n_train": n_train, "n_eval": n_eval,
                "main_tasks": list(MAIN_TASKS), "tasks": {}}
    files = {}
    for k, task in enumerate(TASKS):
        rng = random.Random(f"{seed}:{task.name}")  # per-task stream: adding a task changes no other
        train, evals = split(task, n_train, n_eval, rng)
        train_rows = [dict(zip(("prompt", "completion"), task.render(i))) for i in train]
        eval_rows = [{**dict(zip(("prompt", "completion"), task.render(i))),
                      "query": task.queries[j % len(task.queries)]} for j, i in enumerate(evals)]
        files[f"{task.name}/train.jsonl"] = _jsonl(train_rows)
        files[f"{task.name}/eval.jsonl"] = _jsonl(eval_rows)
        manifest["tasks"][task.name] = {
            "kind": task.kind, "description": task.description, "train": f"{task.name}/train.jsonl",
            "eval": f"{task.name}/eval.jsonl", "memory": {"id": task.name.replace("_", "-"), "text": task.memory,
                                                          "queries": task.queries}}
    for name, rows in probe_rows().items():
        files[f"{name}/eval.jsonl"] = _jsonl(rows)
        manifest[name] = f"{name}/eval.jsonl"
    # the library's bundled 32 rows: the named configs' retain and contrast text (the library's own
    # default KL text adds ntkmirror/retain_clauses.jsonl since run 6; config "default" fits with that)
    files["retain.jsonl"] = RETAIN.read_bytes()
    manifest["retain"] = "retain.jsonl"
    _check_probe_unseen(files)
    manifest["files"] = {}
    for rel, data in files.items():
        path = out / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        manifest["files"][rel] = {"sha256": hashlib.sha256(data).hexdigest(), "rows": data.count(b"\n")}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def _check_probe_unseen(files: dict) -> None:
    """The interference probe and the retain set must not appear in any training file."""
    trained = {json.loads(l)["prompt"] for rel, d in files.items() if rel.endswith("train.jsonl")
               for l in d.decode().splitlines()}
    for rel in [f"{name}/eval.jsonl" for name in PROBES] + ["retain.jsonl"]:
        hit = [p for p in (json.loads(l)["prompt"] for l in files[rel].decode().splitlines()) if p and p in trained]
        if hit:
            raise ValueError(f"{rel} overlaps training prompts: {hit[:3]}")
    check_retain_apart(files["retain.jsonl"].decode().splitlines(), "retain.jsonl")


def probe_hits(texts: list[str]) -> list[str]:
    """The probes' prompts and templates that occur in any of `texts` (case-insensitive)."""
    text = [t.lower() for t in texts]
    probes = [r["prompt"].lower() for rows in probe_rows().values() for r in rows] + list(PROBE_TEMPLATES)
    return [p for p in probes if any(p in t for t in text)]


def check_retain_apart(retain_lines: list[str], name: str) -> None:
    """A retain set must not contain a probe's prompts: the KL term would then train on the probe."""
    hit = probe_hits([r["prompt"] + r["completion"] for r in map(json.loads, retain_lines)])
    if hit:
        raise ValueError(f"{name} contains probe prompts or templates: {hit[:3]}")


def load_manifest(path: str | Path, verify: bool = True) -> dict:
    """Read manifest.json; with verify, every file's sha256 must match (else a clear error)."""
    path = Path(path)
    if path.is_dir():
        path = path / "manifest.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no task manifest (run python -m benchmarks.tasks.generate)")
    manifest = json.loads(path.read_text())
    manifest["root"] = str(path.parent)
    if verify:
        for rel, meta in manifest["files"].items():
            f = path.parent / rel
            digest = hashlib.sha256(f.read_bytes()).hexdigest() if f.is_file() else "missing"
            if digest != meta["sha256"]:
                raise ValueError(f"{f}: sha256 {digest[:12]} does not match the manifest's {meta['sha256'][:12]}")
    return manifest


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("runs/tasks"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--train", type=int, default=256, help="training rows per task")
    ap.add_argument("--eval", type=int, default=64, help="eval rows per task")
    args = ap.parse_args(argv)
    try:
        m = generate(args.out, args.seed, args.train, args.eval)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{'file':34s} {'rows':>5s}  sha256")
    for rel, meta in m["files"].items():
        print(f"{rel:34s} {meta['rows']:5d}  {meta['sha256'][:16]}")
    print(f"wrote {args.out / 'manifest.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
