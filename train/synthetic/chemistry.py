"""Chemistry: molar masses, moles from a mass, and reaction stoichiometry (python from level 4)."""

import random
import re

from train.synthetic.problem import Problem, Step, pick, rand_decimal

# Standard atomic weights, rounded as in school tables.
ATOMIC_MASS = {
    "H": "1.008", "C": "12.011", "N": "14.007", "O": "15.999", "Na": "22.99", "Mg": "24.305",
    "Al": "26.982", "Si": "28.085", "P": "30.974", "S": "32.06", "Cl": "35.45", "K": "39.098",
    "Ca": "40.078", "Fe": "55.845", "Cu": "63.546", "Zn": "65.38",
}

COMPOUNDS = (
    "H2O", "CO2", "NaCl", "CH4", "NH3", "O2", "H2", "N2", "Cl2", "HCl", "NaOH", "KCl", "MgO", "CaO",
    "CaCO3", "H2SO4", "HNO3", "C6H12O6", "C2H6O", "C3H8", "Fe2O3", "Al2O3", "CuSO4", "ZnCl2", "SO2",
    "NO2", "KNO3", "NaHCO3", "SiO2", "H3PO4", "MgCl2", "CaCl2",
)

# (reactants, products) as (coefficient, formula) lists; each balanced.
REACTIONS = (
    ([(2, "H2"), (1, "O2")], [(2, "H2O")]),
    ([(1, "CH4"), (2, "O2")], [(1, "CO2"), (2, "H2O")]),
    ([(1, "N2"), (3, "H2")], [(2, "NH3")]),
    ([(1, "CaCO3")], [(1, "CaO"), (1, "CO2")]),
    ([(1, "C3H8"), (5, "O2")], [(3, "CO2"), (4, "H2O")]),
    ([(4, "Fe"), (3, "O2")], [(2, "Fe2O3")]),
    ([(2, "Mg"), (1, "O2")], [(2, "MgO")]),
    ([(1, "Zn"), (2, "HCl")], [(1, "ZnCl2"), (1, "H2")]),
    ([(1, "NaOH"), (1, "HCl")], [(1, "NaCl"), (1, "H2O")]),
    ([(1, "C6H12O6"), (6, "O2")], [(6, "CO2"), (6, "H2O")]),
    ([(4, "Al"), (3, "O2")], [(2, "Al2O3")]),
)


def parse_formula(formula: str) -> list[tuple[str, int]]:
    """``"C6H12O6" -> [("C", 6), ("H", 12), ("O", 6)]`` (no brackets needed for our compounds)."""
    parts = [(el, int(n) if n else 1) for el, n in re.findall(r"([A-Z][a-z]?)(\d*)", formula)]
    if "".join(f"{el}{n if n > 1 else ''}" for el, n in parts) != formula:
        raise ValueError(f"cannot parse formula {formula!r}")
    return parts


def molar_mass_expr(formula: str) -> str:
    """``"H2O" -> "2 * 1.008 + 15.999"``."""
    return " + ".join(f"{n} * {ATOMIC_MASS[el]}" if n > 1 else ATOMIC_MASS[el] for el, n in parse_formula(formula))


def elements(formulas) -> list[str]:
    """The elements the formulas name, each once, in the order they name them."""
    return list(dict.fromkeys(el for f in formulas for el, _ in parse_formula(f)))


def masses_given(formulas) -> list[str]:
    """The atomic masses the formulas need, in the order the formulas name the elements (the order
    the molar-mass expressions and the python code's table use them in, so the reasoning and the
    code read them off in turn)."""
    return [f"{el} = {ATOMIC_MASS[el]} g/mol" for el in elements(formulas)]


def _equation(reaction) -> str:
    side = lambda terms: " + ".join(f"{c} {f}" if c > 1 else f for c, f in terms)  # noqa: E731
    return f"{side(reaction[0])} -> {side(reaction[1])}"


def make_chemistry(rng: random.Random, level: int, split: str) -> Problem:
    """Level 1-2: molar mass; 3: moles from grams; 4-5: grams of product from grams of reactant."""
    if level <= 2 or (level == 3 and rng.random() < 0.3):
        f = pick(rng, COMPOUNDS[: 12 if level == 1 else None])
        q = pick(rng, ("What is the molar mass of {f}?", "Compute the molar mass of {f} in g/mol.",
                       "How many grams does one mole of {f} weigh?", "Find M({f})."))
        return Problem(question=q.format(f=f), kind="chemistry (molar mass)", given=masses_given([f]),
                       plan="Add the atomic masses, each times its count in the formula.",
                       steps=[Step(f"the molar mass of {f}", molar_mass_expr(f))], unit="g/mol",
                       summary=f"Summed the atomic masses in {f}: {{answer}}.", tolerance=1e-6)
    if level == 3:
        f = pick(rng, COMPOUNDS)
        m = rand_decimal(rng, 1, 500, 1)
        q = pick(rng, ("How many moles are in {m} g of {f}?", "Convert {m} g of {f} to moles.",
                       "A sample of {f} weighs {m} g. How many moles is that?"))
        return Problem(question=q.format(m=m, f=f), kind="chemistry (moles from mass)",
                       given=[f"mass = {m} g"] + masses_given([f]), plan="n = m / M, with M the molar mass.",
                       steps=[Step(f"the molar mass of {f}", molar_mass_expr(f)),
                              Step("the amount in moles", f"round({m} / {{r0}}, 4)")],
                       unit="mol", summary=f"Divided {m} g by the molar mass of {f}: {{answer}}.", tolerance=1e-3)
    reaction = pick(rng, REACTIONS)
    (cr, fr), (cp, fp) = pick(rng, reaction[0]), pick(rng, reaction[1])
    m = rand_decimal(rng, 1, 50 * level, 1)
    eq = _equation(reaction)
    q = pick(rng, ("For the reaction {eq}, how many grams of {p} form from {m} g of {r}?",
                   "{eq}. What mass of {p} is produced from {m} g of {r}?",
                   "Given {eq}, find the grams of {p} made from {m} g of {r} (excess of everything else)."))
    steps = [Step(f"the molar mass of {fr}", molar_mass_expr(fr)),
             Step(f"the molar mass of {fp}", molar_mass_expr(fp)),
             Step(f"the mass of {fp}", f"round({m} / {{r0}} * {cp} / {cr} * {{r1}}, 3)")]
    code = (
        f"masses = {{{', '.join(repr(el) + ': ' + ATOMIC_MASS[el] for el in elements([fr, fp]))}}}\n"
        f"m_r = {' + '.join(f'{n} * masses[{el!r}]' if n > 1 else f'masses[{el!r}]' for el, n in parse_formula(fr))}\n"
        f"m_p = {' + '.join(f'{n} * masses[{el!r}]' if n > 1 else f'masses[{el!r}]' for el, n in parse_formula(fp))}\n"
        f"moles = {m} / m_r * {cp} / {cr}\n"
        "print(round(moles * m_p, 3))"
    )
    return Problem(question=q.format(eq=eq, p=fp, m=m, r=fr), kind="chemistry (stoichiometry)",
                   given=[f"reaction: {eq}", f"mass of {fr} = {m} g"] + masses_given([fr, fp]),
                   plan=f"moles of {fr} = m / M; moles of {fp} = moles * {cp} / {cr}; mass = moles * M({fp}).",
                   steps=steps, code=code, code_purpose="compute the molar masses, the moles and the product mass",
                   unit="g", summary=f"Mass to moles of {fr}, mole ratio {cp}:{cr}, moles to mass of {fp}: {{answer}}.",
                   tolerance=1e-3)
