#!/usr/bin/env python3
"""Write lora-tui's sample dataset: synthetic tool-use conversations in the seed's schema.

Deterministic (seeded): the same command always writes the same bytes.

  data/tool_calls.jsonl      training conversations, labelled desirable (right tool, well-formed call,
                             faithful answer; or, for a question no tool fits, a direct correct answer) or
                             undesirable (wrong tool, malformed call, made-up answer; or a tool called when
                             none is needed). The no-tool rows come from their own seeded generator and sit
                             after every 5th tool row, so the tool rows are the same as before they existed.
  data/heldout.jsonl         held-out prompts with the expected call, for the behaviour metric (entities such
                             as cities and tickers never appear in the training file), then held-out no-tool
                             prompts with "expected": null (no call should be made)
  data/heldout_answers.jsonl held-out conversations up to the tool's result, with the facts a faithful final
                             answer must contain (engine/evaluate/answers.py)

Usage: python scripts/make_sample_data.py [--out data] [--count 1200] [--no-tool 240] [--heldout 120]
                                          [--heldout-no-tool 40] [--answers 40] [--seed 7]
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

TOOLS = {
    "get_weather": {"description": "Current weather for a city",
                    "parameters": {"city": "string", "unit": "celsius|fahrenheit"}},
    "convert_currency": {"description": "Convert an amount between currencies",
                         "parameters": {"amount": "number", "from": "ISO code", "to": "ISO code"}},
    "get_stock_price": {"description": "Latest price of a stock", "parameters": {"ticker": "string"}},
    "set_reminder": {"description": "Set a reminder", "parameters": {"text": "string", "time": "HH:MM"}},
    "search_flights": {"description": "Find flights", "parameters": {"origin": "city", "destination": "city",
                                                                      "date": "YYYY-MM-DD"}},
    "translate": {"description": "Translate text", "parameters": {"text": "string", "language": "string"}},
}

TRAIN_CITIES = ["Paris", "Berlin", "Madrid", "Rome", "Tokyo", "Osaka", "Cairo", "Nairobi", "Lima", "Quito",
                "Oslo", "Dublin", "Prague", "Vienna", "Seoul", "Hanoi", "Denver", "Boston", "Chicago", "Sydney",
                "Perth", "Toronto", "Montreal", "Mumbai", "Delhi", "Istanbul", "Athens", "Warsaw", "Helsinki",
                "Bogota"]
HELDOUT_CITIES = ["Lisbon", "Porto", "Zurich", "Geneva", "Havana", "Manila", "Santiago", "Reykjavik",
                  "Dakar", "Tunis", "Riga", "Tallinn"]
TRAIN_TICKERS = ["AAPL", "MSFT", "GOOG", "AMZN", "NVDA", "TSLA", "META", "INTC", "ORCL", "IBM", "SAP", "SONY"]
HELDOUT_TICKERS = ["ADBE", "CSCO", "QCOM", "UBER", "SHOP", "NFLX"]
CURRENCIES = ["USD", "EUR", "GBP", "JPY", "CHF", "CAD", "AUD", "SEK", "INR", "BRL"]
CURRENCY_NAMES = {"USD": "US dollars", "EUR": "euros", "GBP": "British pounds", "JPY": "Japanese yen",
                  "CHF": "Swiss francs", "CAD": "Canadian dollars", "AUD": "Australian dollars",
                  "SEK": "Swedish kronor", "INR": "Indian rupees", "BRL": "Brazilian reais"}
TRAIN_LANGS = ["French", "German", "Spanish", "Italian", "Japanese", "Portuguese"]
HELDOUT_LANGS = ["Dutch", "Swedish", "Polish"]
PHRASES = ["good morning", "where is the station", "thank you very much", "how much does this cost",
           "I would like a coffee", "see you tomorrow", "the meeting is at noon", "happy birthday"]
TASKS = ["call the dentist", "water the plants", "submit the report", "pick up the kids", "book a table",
         "take the medicine", "join the standup", "pay the rent", "renew the passport", "buy milk"]
CONDITIONS = ["sunny", "cloudy", "light rain", "heavy rain", "snow", "fog", "windy", "clear skies"]

SYSTEM_PROMPTS = [
    "You are a helpful assistant with access to tools.",
    "You are an assistant that can use tools. Answer concisely.",
    "You help users by calling tools when needed and answering from their results.",
]
CALL_HELP = ("To call a tool, reply with exactly <tool_call>{\"name\": ..., \"arguments\": {...}}</tool_call>. "
             "After the result arrives, answer from it.")


def tools_block() -> str:
    lines = []
    for name, spec in TOOLS.items():
        params = ", ".join(f"{k}: {v}" for k, v in spec["parameters"].items())
        lines.append(f"- {name}({params}): {spec['description']}")
    return "Tools:\n" + "\n".join(lines)


def system_prompt(rng: random.Random) -> str:
    return f"{rng.choice(SYSTEM_PROMPTS)}\n{tools_block()}\n{CALL_HELP}"


def call_text(name: str, arguments: dict) -> str:
    return "<tool_call>" + json.dumps({"name": name, "arguments": arguments}) + "</tool_call>"


# Each task maker returns (user text, tool name, arguments, tool result dict, faithful answer, made-up answer).
def weather(rng, cities):
    city, unit = rng.choice(cities), rng.choice(["celsius", "fahrenheit"])
    temp = rng.randint(-5, 35) if unit == "celsius" else rng.randint(25, 95)
    cond = rng.choice(CONDITIONS)
    sym = "°C" if unit == "celsius" else "°F"
    user = rng.choice([f"What's the weather in {city}?", f"How warm is it in {city} right now, in {unit}?",
                       f"Is it raining in {city}? Give me {unit}.", f"Weather for {city} please ({unit})."])
    if "in celsius" not in user and "fahrenheit" not in user and unit not in user:
        unit = "celsius"
        temp = rng.randint(-5, 35)
        sym = "°C"
    result = {"city": city, "temperature": temp, "unit": unit, "condition": cond}
    fake = temp + rng.choice([-9, -6, 7, 11])
    return (user, "get_weather", {"city": city, "unit": unit}, result,
            f"It is {temp}{sym} and {cond} in {city}.", f"It is {fake}{sym} and {rng.choice(CONDITIONS)} in {city}.")


def currency(rng, _cities):
    a, b = rng.sample(CURRENCIES, 2)
    amount = rng.choice([5, 20, 50, 75, 100, 120, 250, 500, 1000, 1500])
    rate = round(rng.uniform(0.5, 2.0), 4)
    user = rng.choice([f"Convert {amount} {a} to {b}.", f"How much is {amount} {CURRENCY_NAMES[a]} in {CURRENCY_NAMES[b]}?",
                       f"I have {amount} {a}. What is that in {b}?"])
    value = round(amount * rate, 2)
    return (user, "convert_currency", {"amount": amount, "from": a, "to": b},
            {"amount": amount, "from": a, "to": b, "result": value},
            f"{amount} {a} is {value} {b}.", f"{amount} {a} is {round(value * 1.37, 2)} {b}.")


def stock(rng, _cities, tickers=TRAIN_TICKERS):
    t = rng.choice(tickers)
    price = round(rng.uniform(20, 900), 2)
    user = rng.choice([f"What is {t} trading at?", f"Price of {t} stock?", f"Check the latest {t} share price."])
    return (user, "get_stock_price", {"ticker": t}, {"ticker": t, "price": price, "currency": "USD"},
            f"{t} is trading at ${price}.", f"{t} is trading at ${round(price * 0.8, 2)}.")


def reminder(rng, _cities):
    task = rng.choice(TASKS)
    time = f"{rng.randint(6, 21):02d}:{rng.choice(['00', '15', '30', '45'])}"
    user = rng.choice([f"Remind me to {task} at {time}.", f"Set a reminder at {time} to {task}.",
                       f"At {time}, remind me: {task}."])
    return (user, "set_reminder", {"text": task, "time": time}, {"status": "ok", "time": time},
            f"Done: I will remind you to {task} at {time}.", f"Done: I will remind you to {task} tomorrow.")


def flights(rng, cities):
    o, d = rng.sample(cities, 2)
    date = f"2026-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}"
    n = rng.randint(0, 6)
    price = rng.randint(80, 900)
    user = rng.choice([f"Find flights from {o} to {d} on {date}.", f"Any flights {o} to {d} on {date}?",
                       f"I need to fly from {o} to {d}, date {date}."])
    answer = (f"I found {n} flights from {o} to {d} on {date}" + (f"; the cheapest is ${price}." if n else "."))
    return (user, "search_flights", {"origin": o, "destination": d, "date": date},
            {"flights": n, "cheapest": price if n else None}, answer,
            f"I found {n + 3} flights from {o} to {d}; the cheapest is ${price // 2}.")


def translate(rng, _cities, langs=TRAIN_LANGS):
    text, lang = rng.choice(PHRASES), rng.choice(langs)
    out = f"[{lang} for '{text}']"
    user = rng.choice([f"Translate '{text}' into {lang}.", f"How do you say '{text}' in {lang}?"])
    return (user, "translate", {"text": text, "language": lang}, {"translation": out},
            f"In {lang}: {out}", f"In {lang}: {text[::-1]}")


MAKERS = [weather, currency, stock, reminder, flights, translate]


def malformed(rng, name: str, arguments: dict) -> str:
    kind = rng.randrange(3)
    if kind == 0:  # broken JSON
        return "<tool_call>" + json.dumps({"name": name, "arguments": arguments})[:-2] + "</tool_call>"
    if kind == 1:  # missing an argument
        args = dict(arguments)
        args.pop(next(iter(args)))
        return call_text(name, args)
    return f"<tool_call>{name}({', '.join(map(str, arguments.values()))})</tool_call>"  # not JSON at all


def conversation(rng: random.Random, desirable: bool) -> list[dict]:
    msgs = [{"role": "system", "content": system_prompt(rng)}]
    turns = 2 if rng.random() < 0.25 else 1
    flaw_turn = rng.randrange(turns)
    for turn in range(turns):
        user, name, args, result, answer, fake = rng.choice(MAKERS)(rng, TRAIN_CITIES)
        msgs.append({"role": "user", "content": user})
        flaw = None if desirable or turn != flaw_turn else rng.choice(["wrong_tool", "malformed", "made_up"])
        if flaw == "wrong_tool":
            other = rng.choice([m for m in MAKERS if m.__name__ != name and m is not None])
            _, wrong_name, wrong_args, wrong_result, wrong_answer, _ = other(rng, TRAIN_CITIES)
            msgs.append({"role": "assistant", "content": call_text(wrong_name, wrong_args)})
            msgs.append({"role": "tool", "content": json.dumps(wrong_result)})
            msgs.append({"role": "assistant", "content": wrong_answer})
        elif flaw == "malformed":
            msgs.append({"role": "assistant", "content": malformed(rng, name, args)})
            msgs.append({"role": "tool", "content": json.dumps({"error": "could not parse the tool call"})})
            msgs.append({"role": "assistant", "content": answer})
        else:
            msgs.append({"role": "assistant", "content": call_text(name, args)})
            msgs.append({"role": "tool", "content": json.dumps(result)})
            msgs.append({"role": "assistant", "content": fake if flaw == "made_up" else answer})
    return msgs


def as_from_value(msgs: list[dict]) -> list[dict]:
    names = {"system": "system", "user": "human", "assistant": "gpt", "tool": "tool"}
    return [{"from": names[m["role"]], "value": m["content"]} for m in msgs]


def heldout_item(rng: random.Random, index: int) -> dict:
    maker = MAKERS[index % len(MAKERS)]
    if maker is stock:
        user, name, args, *_ = stock(rng, None, HELDOUT_TICKERS)
    elif maker is translate:
        user, name, args, *_ = translate(rng, None, HELDOUT_LANGS)
    else:
        user, name, args, *_ = maker(rng, HELDOUT_CITIES)
    return {"id": f"h{index:04d}", "messages": [{"role": "system", "content": system_prompt(rng)},
                                                {"role": "user", "content": user}],
            "expected": {"name": name, "arguments": args}}


# Questions that no tool fits. Training and held-out entities are disjoint (other countries, other number
# ranges, other facts), so the held-out no-tool prompts measure the behaviour rather than recall.
TRAIN_CAPITALS = {"France": "Paris", "Germany": "Berlin", "Japan": "Tokyo", "Kenya": "Nairobi", "Peru": "Lima",
                  "Norway": "Oslo", "Egypt": "Cairo", "Canada": "Ottawa", "Australia": "Canberra",
                  "Italy": "Rome", "Spain": "Madrid", "Greece": "Athens", "Poland": "Warsaw",
                  "Finland": "Helsinki", "Ireland": "Dublin", "Austria": "Vienna"}
HELDOUT_CAPITALS = {"Portugal": "Lisbon", "Cuba": "Havana", "Senegal": "Dakar", "Latvia": "Riga",
                    "Estonia": "Tallinn", "Tunisia": "Tunis", "Iceland": "Reykjavik", "Hungary": "Budapest",
                    "Denmark": "Copenhagen", "Belgium": "Brussels"}
TRAIN_NUMBERS, HELDOUT_NUMBERS = (2, 40), (101, 199)
TRAIN_FACTS = [
    ("How many centimetres are in a metre?", "There are 100 centimetres in a metre."),
    ("How many minutes are in an hour?", "There are 60 minutes in an hour."),
    ("How many days are in a week?", "A week has 7 days."),
    ("How many grams are in a kilogram?", "There are 1000 grams in a kilogram."),
    ("How many months are in a year?", "A year has 12 months."),
    ("At what temperature does water freeze, in Celsius?", "Water freezes at 0°C."),
    ("What does CPU stand for?", "CPU stands for central processing unit."),
    ("What does HTML stand for?", "HTML stands for HyperText Markup Language."),
    ("What is a noun?", "A noun is a word that names a person, place, thing or idea."),
    ("What is a prime number?", "A prime number is a whole number above 1 divisible only by 1 and itself."),
    ("What is photosynthesis?", "Photosynthesis is how plants turn light, water and carbon dioxide into sugar "
                                "and oxygen."),
]
HELDOUT_FACTS = [
    ("How many hours are in a day?", "A day has 24 hours."),
    ("How many metres are in a kilometre?", "There are 1000 metres in a kilometre."),
    ("At what temperature does water boil, in Celsius?", "Water boils at 100°C at sea level."),
    ("What does GPU stand for?", "GPU stands for graphics processing unit."),
    ("What is a verb?", "A verb is a word that describes an action or a state."),
    ("What does URL stand for?", "URL stands for Uniform Resource Locator."),
]
TRAIN_TALK = [("Hi there!", "Hello! How can I help you today?"),
              ("Thanks for your help!", "You're welcome! Happy to help."),
              ("How are you?", "I'm doing well, thank you. How can I help?"),
              ("Good night!", "Good night! Talk to you soon."),
              ("Tell me a joke.", "Why did the scarecrow win an award? Because he was outstanding in his field.")]
HELDOUT_TALK = [("Hello, who are you?", "I'm an assistant. I can answer questions and use tools when needed."),
                ("Thank you so much!", "You're very welcome!"),
                ("Hey, nice to meet you!", "Nice to meet you too! What can I do for you?")]


def no_tool_question(rng: random.Random, heldout: bool = False) -> tuple[str, str]:
    """(user text, correct direct answer) for a question that needs no tool."""
    kind = rng.randrange(4)
    if kind == 0:
        country, capital = rng.choice(sorted((HELDOUT_CAPITALS if heldout else TRAIN_CAPITALS).items()))
        return (rng.choice([f"What is the capital of {country}?", f"Which city is the capital of {country}?"]),
                f"The capital of {country} is {capital}.")
    if kind == 1:
        a, b = (rng.randint(*(HELDOUT_NUMBERS if heldout else TRAIN_NUMBERS)) for _ in range(2))
        op, value = rng.choice([("plus", a + b), ("minus", a - b), ("times", a * b)])
        return rng.choice([f"What is {a} {op} {b}?", f"Quick one: {a} {op} {b}?"]), f"{a} {op} {b} is {value}."
    return rng.choice(HELDOUT_FACTS if heldout else TRAIN_FACTS) if kind == 2 else \
        rng.choice(HELDOUT_TALK if heldout else TRAIN_TALK)


def no_tool_conversation(rng: random.Random, desirable: bool) -> list[dict]:
    """A question no tool fits. The undesirable version calls an irrelevant tool anyway, then answers."""
    user, answer = no_tool_question(rng)
    msgs = [{"role": "system", "content": system_prompt(rng)}, {"role": "user", "content": user}]
    if not desirable:
        if rng.random() < 0.5:
            _, name, args, result, *_ = weather(rng, TRAIN_CITIES)
        else:
            lang = rng.choice(TRAIN_LANGS)
            name, args = "translate", {"text": user, "language": lang}
            result = {"translation": f"[{lang} for '{user}']"}
        msgs += [{"role": "assistant", "content": call_text(name, args)},
                 {"role": "tool", "content": json.dumps(result, ensure_ascii=False)}]
    return msgs + [{"role": "assistant", "content": answer}]


def labelled_row(msgs: list[dict], desirable: bool, rng: random.Random) -> str:
    if rng.random() < 0.5:
        msgs = as_from_value(msgs)
    return json.dumps({"conversations": msgs, "label": "desirable" if desirable else "undesirable"},
                      ensure_ascii=False) + "\n"


def heldout_no_tool_item(rng: random.Random, index: int) -> dict:
    user, _ = no_tool_question(rng, heldout=True)
    return {"id": f"h{index:04d}", "messages": [{"role": "system", "content": system_prompt(rng)},
                                                {"role": "user", "content": user}], "expected": None}


# What a faithful final answer must contain, per tool: the figures and names of the tool's result.
FACTS = {"get_weather": lambda a, r: [str(r["temperature"]), r["city"], r["condition"]],
         "convert_currency": lambda a, r: [str(r["result"])],
         "get_stock_price": lambda a, r: [r["ticker"], str(r["price"])],
         "set_reminder": lambda a, r: [a["text"], a["time"]],
         "search_flights": lambda a, r: [str(r["flights"]), a["destination"]]
                                        + ([str(r["cheapest"])] if r["flights"] else []),
         "translate": lambda a, r: [r["translation"]]}


def answer_item(rng: random.Random, index: int) -> dict:
    """A held-out conversation up to the tool's result: the model writes the final answer."""
    maker = MAKERS[index % len(MAKERS)]
    if maker is stock:
        user, name, args, result, *_ = stock(rng, None, HELDOUT_TICKERS)
    elif maker is translate:
        user, name, args, result, *_ = translate(rng, None, HELDOUT_LANGS)
    else:
        user, name, args, result, *_ = maker(rng, HELDOUT_CITIES)
    messages = [{"role": "system", "content": system_prompt(rng)}, {"role": "user", "content": user},
                {"role": "assistant", "content": call_text(name, args)},
                {"role": "tool", "content": json.dumps(result, ensure_ascii=False)}]
    return {"id": f"a{index:04d}", "messages": messages, "facts": FACTS[name](args, result), "tool": name}


def write_lines(path: Path, lines) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as fh:
        fh.writelines(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent.parent / "data"))
    ap.add_argument("--count", type=int, default=1200, help="tool-use conversations")
    ap.add_argument("--no-tool", type=int, default=240, help="conversations that need no tool")
    ap.add_argument("--heldout", type=int, default=120, help="held-out prompts with an expected call")
    ap.add_argument("--heldout-no-tool", type=int, default=40, help="held-out prompts that need no tool")
    ap.add_argument("--answers", type=int, default=40, help="held-out final-answer items")
    ap.add_argument("--undesirable", type=float, default=0.25, help="share of undesirable conversations")
    ap.add_argument("--seed", type=int, default=7)
    args = ap.parse_args(argv)
    # The tool rows and held-out tool prompts draw from `rng` exactly as before the no-tool rows existed
    # (earlier measurements stay comparable); everything added since draws from its own generator.
    rng = random.Random(args.seed)
    extra_rng = random.Random(f"no-tool-{args.seed}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    every = max(1, args.count // args.no_tool) if args.no_tool else 0
    rows, added = [], 0
    for i in range(args.count):
        desirable = rng.random() >= args.undesirable
        rows.append(labelled_row(conversation(rng, desirable), desirable, rng))
        if every and (i + 1) % every == 0 and added < args.no_tool:
            desirable = extra_rng.random() >= args.undesirable
            rows.append(labelled_row(no_tool_conversation(extra_rng, desirable), desirable, extra_rng))
            added += 1
    for _ in range(args.no_tool - added):  # more no-tool rows than slots: the rest at the end
        desirable = extra_rng.random() >= args.undesirable
        rows.append(labelled_row(no_tool_conversation(extra_rng, desirable), desirable, extra_rng))
    write_lines(out / "tool_calls.jsonl", rows)
    heldout = [heldout_item(rng, i) for i in range(args.heldout)]
    heldout += [heldout_no_tool_item(extra_rng, args.heldout + i) for i in range(args.heldout_no_tool)]
    write_lines(out / "heldout.jsonl", (json.dumps(h, ensure_ascii=False) + "\n" for h in heldout))
    write_lines(out / "heldout_answers.jsonl",
                (json.dumps(answer_item(extra_rng, i), ensure_ascii=False) + "\n" for i in range(args.answers)))
    print(f"wrote {len(rows)} conversations ({args.no_tool} needing no tool) to {out / 'tool_calls.jsonl'}, "
          f"{len(heldout)} held-out prompts ({args.heldout_no_tool} needing no tool) to {out / 'heldout.jsonl'} "
          f"and {args.answers} final-answer items to {out / 'heldout_answers.jsonl'}")


if __name__ == "__main__":
    main()
