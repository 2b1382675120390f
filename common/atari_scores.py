"""Atari reference scores and game lists for human-normalized scores.

Two tables of per-game (random, human) scores, TABLES[name]:
    dopamine  Dopamine's (dopamine/labs/atari_100k/normalization_utils.py), which rliable's Atari data and the IQMs of
              Obando-Ceron et al. use: 55 games. The default of common/plot.py.
    dqn_zoo   DQN Zoo's (dqn_zoo/atari_data.py; the "human_at30" protocol: at least 3 episodes, 1-30 no-op starts,
              episodes capped at 108k frames): the 57 games of Atari-57.
They agree but for three games: Dopamine's has no human score for Defender and Surround, and VideoPinball's random
score is 0.0 there (16,256.9 in DQN Zoo's). VideoPinball is one of the paper's 15 games: a raw 30,000 is 1.70 with
Dopamine's table and 9.74 with DQN Zoo's, so the two tables' aggregates are not comparable. Five games of the 60-game
set have no human score in either (AirRaid, Carnival, ElevatorAction, JourneyEscape, Pooyan): they cannot be normalized
and are left out of aggregates.

Human-normalized score: HNS = (score - random) / (human - random).
"""

DQN_ZOO = {
    "Alien": (227.8, 7127.7),
    "Amidar": (5.8, 1719.5),
    "Assault": (222.4, 742.0),
    "Asterix": (210.0, 8503.3),
    "Asteroids": (719.1, 47388.7),
    "Atlantis": (12850.0, 29028.1),
    "BankHeist": (14.2, 753.1),
    "BattleZone": (2360.0, 37187.5),
    "BeamRider": (363.9, 16926.5),
    "Berzerk": (123.7, 2630.4),
    "Bowling": (23.1, 160.7),
    "Boxing": (0.1, 12.1),
    "Breakout": (1.7, 30.5),
    "Centipede": (2090.9, 12017.0),
    "ChopperCommand": (811.0, 7387.8),
    "CrazyClimber": (10780.5, 35829.4),
    "Defender": (2874.5, 18688.9),
    "DemonAttack": (152.1, 1971.0),
    "DoubleDunk": (-18.6, -16.4),
    "Enduro": (0.0, 860.5),
    "FishingDerby": (-91.7, -38.7),
    "Freeway": (0.0, 29.6),
    "Frostbite": (65.2, 4334.7),
    "Gopher": (257.6, 2412.5),
    "Gravitar": (173.0, 3351.4),
    "Hero": (1027.0, 30826.4),
    "IceHockey": (-11.2, 0.9),
    "Jamesbond": (29.0, 302.8),
    "Kangaroo": (52.0, 3035.0),
    "Krull": (1598.0, 2665.5),
    "KungFuMaster": (258.5, 22736.3),
    "MontezumaRevenge": (0.0, 4753.3),
    "MsPacman": (307.3, 6951.6),
    "NameThisGame": (2292.3, 8049.0),
    "Phoenix": (761.4, 7242.6),
    "Pitfall": (-229.4, 6463.7),
    "Pong": (-20.7, 14.6),
    "PrivateEye": (24.9, 69571.3),
    "Qbert": (163.9, 13455.0),
    "Riverraid": (1338.5, 17118.0),
    "RoadRunner": (11.5, 7845.0),
    "Robotank": (2.2, 11.9),
    "Seaquest": (68.4, 42054.7),
    "Skiing": (-17098.1, -4336.9),
    "Solaris": (1236.3, 12326.7),
    "SpaceInvaders": (148.0, 1668.7),
    "StarGunner": (664.0, 10250.0),
    "Surround": (-10.0, 6.5),
    "Tennis": (-23.8, -8.3),
    "TimePilot": (3568.0, 5229.2),
    "Tutankham": (11.4, 167.6),
    "UpNDown": (533.4, 11693.2),
    "Venture": (0.0, 1187.5),
    "VideoPinball": (16256.9, 17667.9),
    "WizardOfWor": (563.5, 4756.5),
    "YarsRevenge": (3092.9, 54576.9),
    "Zaxxon": (32.5, 9173.3),
}

DOPAMINE = {game: scores for game, scores in DQN_ZOO.items() if game not in ("Defender", "Surround")}
DOPAMINE["VideoPinball"] = (0.0, 17667.9)  # DQN Zoo's random score is 16,256.9
TABLES = {"dopamine": DOPAMINE, "dqn_zoo": DQN_ZOO}

# the 15 games of Graesser et al. (2022), used by Obando-Ceron et al. for every main result (App. B)
GAMES_15 = (
    "MsPacman",
    "Pong",
    "Qbert",
    "Assault",
    "Asterix",
    "BeamRider",
    "Boxing",
    "Breakout",
    "CrazyClimber",
    "DemonAttack",
    "Enduro",
    "FishingDerby",
    "SpaceInvaders",
    "Tutankham",
    "VideoPinball",
)

# the 26 games of Atari 100k (Kaiser et al. 2020)
GAMES_100K = (
    "Alien",
    "Amidar",
    "Assault",
    "Asterix",
    "BankHeist",
    "BattleZone",
    "Boxing",
    "Breakout",
    "ChopperCommand",
    "CrazyClimber",
    "DemonAttack",
    "Freeway",
    "Frostbite",
    "Gopher",
    "Hero",
    "Jamesbond",
    "Kangaroo",
    "Krull",
    "KungFuMaster",
    "MsPacman",
    "Pong",
    "PrivateEye",
    "Qbert",
    "RoadRunner",
    "Seaquest",
    "UpNDown",
)

# Dopamine's 60 games (Obando-Ceron et al. Fig. 6; also the games of the DQN Replay Dataset): Atari-57 without Defender
# and Surround, plus five games without a human score
NO_HUMAN_SCORE = ("AirRaid", "Carnival", "ElevatorAction", "JourneyEscape", "Pooyan")
GAMES_60 = tuple(sorted(set(DOPAMINE) | set(NO_HUMAN_SCORE)))


def game_of(env_id: str):
    """The game of an ALE env id ("ALE/MsPacman-v5" -> "MsPacman"), None for a non-Atari id."""
    if not env_id.startswith("ALE/"):
        return None
    return env_id[len("ALE/") :].rsplit("-v", 1)[0]


def human_normalized(game: str, score, table: str = "dopamine"):
    """(score - random) / (human - random) with the scores of TABLES[table] (KeyError for a game it does not hold)."""
    random, human = TABLES[table][game]
    return (score - random) / (human - random)
