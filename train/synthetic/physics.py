"""Physics formulas: kinematics (constant acceleration, free fall) and DC circuits."""

import random

from train.synthetic.problem import Problem, Step, pick, rand_decimal

G = "9.81"


def _num(rng: random.Random, level: int, lo: int, hi: int) -> str:
    return rand_decimal(rng, lo, hi * (1 + level), 0 if level <= 1 else (1 if level <= 3 else 2))


def _p(question, kind, given, plan, steps, unit, summary) -> Problem:
    return Problem(question=question, kind=kind, given=given, plan=plan, steps=steps, unit=unit,
                   summary=summary, tolerance=1e-6)


def _final_velocity(rng, level):
    u, a, t = _num(rng, level, 0, 10), _num(rng, level, 1, 4), _num(rng, level, 1, 8)
    q = pick(rng, ("A car starts at {u} m/s and accelerates at {a} m/s^2 for {t} s. What is its final speed?",
                   "An object moving at {u} m/s speeds up at {a} m/s^2. How fast is it after {t} seconds?",
                   "Initial velocity {u} m/s, acceleration {a} m/s^2, time {t} s: find the final velocity."))
    return _p(q.format(u=u, a=a, t=t), "kinematics (final velocity)", [f"u = {u} m/s", f"a = {a} m/s^2", f"t = {t} s"],
              "v = u + a * t.", [Step("the final velocity", f"{u} + {a} * {t}")], "m/s",
              "Used v = u + a*t to get {answer}.")


def _distance(rng, level):
    u, a, t = _num(rng, level, 0, 10), _num(rng, level, 1, 4), _num(rng, level, 1, 8)
    q = pick(rng, ("A cyclist at {u} m/s accelerates at {a} m/s^2 for {t} s. How far does she travel?",
                   "Starting at {u} m/s with acceleration {a} m/s^2, what distance is covered in {t} s?",
                   "Find the displacement: u = {u} m/s, a = {a} m/s^2, t = {t} s."))
    return _p(q.format(u=u, a=a, t=t), "kinematics (distance)", [f"u = {u} m/s", f"a = {a} m/s^2", f"t = {t} s"],
              "s = u * t + 0.5 * a * t**2.", [Step("the distance", f"{u} * {t} + 0.5 * {a} * {t}**2")], "m",
              "Used s = u*t + a*t^2/2 to get {answer}.")


def _velocity_from_distance(rng, level):
    u, a, s = _num(rng, level, 0, 10), _num(rng, level, 1, 5), _num(rng, level, 5, 50)
    q = pick(rng, ("A ball rolls at {u} m/s and accelerates at {a} m/s^2 over {s} m. What is its final speed?",
                   "Find the final velocity after {s} m if u = {u} m/s and a = {a} m/s^2."))
    return _p(q.format(u=u, a=a, s=s), "kinematics (v^2 = u^2 + 2as)", [f"u = {u} m/s", f"a = {a} m/s^2", f"s = {s} m"],
              "v = sqrt(u**2 + 2 * a * s).", [Step("the final velocity", f"sqrt({u}**2 + 2 * {a} * {s})")], "m/s",
              "Used v = sqrt(u^2 + 2as) to get {answer}.")


def _free_fall(rng, level):
    h = _num(rng, level, 2, 40)
    q = pick(rng, ("A stone is dropped from {h} m. How long does it take to hit the ground? Use g = 9.81 m/s^2.",
                   "How many seconds does an object need to fall {h} m from rest (g = 9.81 m/s^2)?"))
    return _p(q.format(h=h), "kinematics (free fall time)", [f"h = {h} m", f"g = {G} m/s^2"],
              "t = sqrt(2 * h / g).", [Step("the fall time", f"sqrt(2 * {h} / {G})")], "s",
              "Used t = sqrt(2h/g) to get {answer}.")


def _average_speed(rng, level):
    d, t = _num(rng, level, 10, 300), _num(rng, level, 1, 6)
    q = pick(rng, ("A bus covers {d} km in {t} hours. What is its average speed?",
                   "What is the average speed for {d} km travelled in {t} h?"))
    return _p(q.format(d=d, t=t), "kinematics (average speed)", [f"d = {d} km", f"t = {t} h"],
              "speed = d / t.", [Step("the average speed", f"{d} / {t}")], "km/h",
              "Divided distance by time to get {answer}.")


def _ohm(rng, level):
    which = pick(rng, ("V", "I", "R"))
    i, r = _num(rng, level, 1, 5), _num(rng, level, 2, 100)
    v = _num(rng, level, 1, 24)
    if which == "V":
        q = pick(rng, ("A current of {i} A flows through a {r} ohm resistor. What is the voltage across it?",
                       "Find the voltage: I = {i} A, R = {r} ohm."))
        return _p(q.format(i=i, r=r), "circuits (Ohm's law)", [f"I = {i} A", f"R = {r} ohm"], "V = I * R.",
                  [Step("the voltage", f"{i} * {r}")], "V", "Ohm's law V = I*R gives {answer}.")
    if which == "I":
        q = pick(rng, ("A {v} V battery is connected to a {r} ohm resistor. What current flows?",
                       "Find the current: V = {v} V, R = {r} ohm."))
        return _p(q.format(v=v, r=r), "circuits (Ohm's law)", [f"V = {v} V", f"R = {r} ohm"], "I = V / R.",
                  [Step("the current", f"{v} / {r}")], "A", "Ohm's law I = V/R gives {answer}.")
    q = pick(rng, ("A {v} V source drives {i} A through a resistor. What is its resistance?",
                   "Find the resistance: V = {v} V, I = {i} A."))
    return _p(q.format(v=v, i=i), "circuits (Ohm's law)", [f"V = {v} V", f"I = {i} A"], "R = V / I.",
              [Step("the resistance", f"{v} / {i}")], "ohm", "Ohm's law R = V/I gives {answer}.")


def _power(rng, level):
    i, r, v = _num(rng, level, 1, 5), _num(rng, level, 2, 100), _num(rng, level, 1, 24)
    if rng.random() < 0.5:
        q = pick(rng, ("A current of {i} A flows through a {r} ohm heater. How much power does it use?",
                       "Find the power dissipated by {i} A in {r} ohm."))
        return _p(q.format(i=i, r=r), "circuits (power)", [f"I = {i} A", f"R = {r} ohm"], "P = I**2 * R.",
                  [Step("the power", f"{i}**2 * {r}")], "W", "P = I^2*R gives {answer}.")
    q = pick(rng, ("A {v} V supply feeds a {r} ohm load. What power does the load use?",
                   "Find the power: V = {v} V across R = {r} ohm."))
    return _p(q.format(v=v, r=r), "circuits (power)", [f"V = {v} V", f"R = {r} ohm"], "P = V**2 / R.",
              [Step("the power", f"{v}**2 / {r}")], "W", "P = V^2/R gives {answer}.")


def _resistors(rng, level):
    n = 2 if level < 5 else 3
    rs = [_num(rng, level, 2, 60) for _ in range(n)]
    parallel = level >= 3 and rng.random() < 0.6
    listed = ", ".join(f"{r} ohm" for r in rs)
    if not parallel:
        q = pick(rng, ("Resistors of {rs} are connected in series. What is the total resistance?",
                       "Find the equivalent resistance of {rs} in series."))
        return _p(q.format(rs=listed), "circuits (series resistance)", [f"R{k + 1} = {r} ohm" for k, r in enumerate(rs)],
                  "R = R1 + R2 + ... in series.", [Step("the total resistance", " + ".join(rs))], "ohm",
                  "Added the series resistances: {answer}.")
    steps = [Step("the equivalent resistance", "1 / (" + " + ".join(f"1 / {r}" for r in rs) + ")")]
    unit, plan, ask = "ohm", "1/R = 1/R1 + 1/R2 + ... in parallel.", "What is the equivalent resistance?"
    given = [f"R{k + 1} = {r} ohm" for k, r in enumerate(rs)]
    if level >= 4:
        v = _num(rng, level, 1, 24)
        steps.append(Step("the total current", f"{v} / {{r0}}"))
        unit, plan, ask = "A", plan + " Then I = V / R.", f"What total current does a {v} V source drive through them?"
        given.append(f"V = {v} V")
    q = pick(rng, ("Resistors of {rs} are connected in parallel. {ask}", "{rs} in parallel. {ask}"))
    return _p(q.format(rs=listed, ask=ask), "circuits (parallel resistance)", given, plan, steps, unit,
              "Combined the parallel resistances" + (" and applied Ohm's law" if level >= 4 else "") + ": {answer}.")


def _energy(rng, level):
    p, t = _num(rng, level, 10, 200), _num(rng, level, 1, 60)
    q = pick(rng, ("A {p} W lamp is on for {t} s. How much energy does it use?",
                   "Energy used by a {p} W device in {t} seconds?"))
    return _p(q.format(p=p, t=t), "circuits (energy)", [f"P = {p} W", f"t = {t} s"], "E = P * t.",
              [Step("the energy", f"{p} * {t}")], "J", "E = P*t gives {answer}.")


_BY_LEVEL = {
    1: (_final_velocity, _average_speed, _ohm, _energy),
    2: (_final_velocity, _average_speed, _ohm, _power, _resistors, _energy),
    3: (_distance, _power, _resistors, _ohm, _free_fall),
    4: (_distance, _velocity_from_distance, _free_fall, _resistors, _power),
    5: (_distance, _velocity_from_distance, _free_fall, _resistors),
}


def make_physics(rng: random.Random, level: int, split: str) -> Problem:
    """A formula problem; higher levels use two-term formulas, square roots and parallel circuits."""
    return pick(rng, _BY_LEVEL[level])(rng, level)
