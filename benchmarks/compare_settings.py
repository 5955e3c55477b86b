"""`dvd bench compare`'s modes and settings: which CPUs each mode's deployments are pinned to under a setting
(`placements`, the `dvd serve` flags), and the setting in words for the output. The rules themselves are
explained in compare.py's docstring (`dvd bench compare --help`).
"""

from __future__ import annotations

from dvd.cpus import parse_cpu_list

MODES = ("coupled", "coupled-dp", "dvd", "dvd+vir", "dvd-pd")
SETTINGS = ("paper", "equal")


def default_modes(setting: str) -> str:
    """coupled, dvd, dvd+vir; on equal hardware also coupled-dp, the best coupled baseline there."""
    return "coupled,coupled-dp,dvd,dvd+vir" if setting == "equal" else "coupled,dvd,dvd+vir"


def coupled_cpus(setting: str, language_cpus: str, vision_cpus: str) -> str:
    """The CPUs coupled gets: the language side's (paper), or both sides' (equal)."""
    return language_cpus if setting == "paper" else f"{language_cpus},{vision_cpus}"


def placements(mode: str, setting: str, language_cpus: str, vision_cpus: str) -> list[list[str]]:
    """`dvd serve` flags placing `mode` under `setting`: one list per deployment (coupled-dp: one per CPU)."""
    cpus = coupled_cpus(setting, language_cpus, vision_cpus)
    if mode == "coupled":
        return [["--coupled", "--cpus", cpus]]
    if mode == "coupled-dp":
        return [["--coupled", "--cpus", str(cpu)] for cpu in parse_cpu_list(cpus)]
    if mode == "dvd-pd":  # the decodes alone on the language CPUs: image prefills go beside the vision server
        return [["--decode-cpus", language_cpus, "--prefill-cpus", vision_cpus, "--vision-cpus", vision_cpus,
                 "--gateway-cpus", vision_cpus, "--prefill-replicas", "1", "--decode-replicas", "1"]]
    return [["--language-cpus", language_cpus, "--vision-cpus", vision_cpus, "--gateway-cpus", vision_cpus]]


def describe_setting(setting: str, language_cpus: str, vision_cpus: str, dp: bool = False, pd: bool = False) -> str:
    """The setting in words; `dp`: also where coupled-dp's replicas run; `pd`: where dvd-pd's servers run."""
    cpus = coupled_cpus(setting, language_cpus, vision_cpus)
    dp_text = (f"; coupled-dp runs one coupled replica on each CPU of {cpus}, each request to the one with the "
               "fewest outstanding") if dp else ""
    dp_text += (f"; DvD with P/D runs the decode server alone on CPU {language_cpus} and the prefill server with "
                f"the vision server (and gateway) on CPU {vision_cpus}") if pd else ""
    if setting == "paper":
        return (f"setting paper: coupled runs the whole model on CPU {language_cpus}; DvD runs the language server "
                f"on CPU {language_cpus} and the vision server (and gateway) on CPU {vision_cpus}{dp_text}")
    return (f"setting equal: coupled runs on CPUs {language_cpus},{vision_cpus}; DvD runs the language server on "
            f"CPU {language_cpus} and the vision server (and gateway) on CPU {vision_cpus}{dp_text}")

