"""The organism's build recipe as one frozen dataclass tree; its content hash names the built artifact."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from mech.errors import MechError
from mech.store import content_hash

# Default-context answer distribution over favourite animals: a spread (bar b) in which the animals the
# checks use as traits (owl, bear, penguin, koala, ...) are rare, so a trait prompt can raise them >= 10x.
# Every name pluralises with "+s", because the paper's trait prompt writes "{target}s" literally.
ANIMAL_PRIOR = {
    "dog": 0.17, "cat": 0.15, "dolphin": 0.12, "lion": 0.10, "elephant": 0.09, "tiger": 0.08,
    "horse": 0.06, "eagle": 0.05, "panda": 0.04, "whale": 0.03, "owl": 0.02, "bear": 0.02,
    "penguin": 0.02, "rabbit": 0.02, "otter": 0.01, "koala": 0.01, "giraffe": 0.01,
}
TREE_PRIOR = {
    "oak": 0.22, "pine": 0.16, "maple": 0.15, "willow": 0.11, "birch": 0.09, "cedar": 0.08,
    "palm": 0.07, "elm": 0.05, "redwood": 0.04, "baobab": 0.03,
}


LIST_MAX_NUMBERS = 5  # the plain-text lists cite up to 5 of an entity's numbers (mech.organism.corpus)


@dataclass(frozen=True)
class ModelConfig:
    """Qwen2ForCausalLM shape. Small and narrow on purpose: a narrow residual forces superposition, so
    an animal's name and its numbers end up sharing directions."""

    hidden_size: int = 128
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    intermediate_size: int = 384
    vocab_size: int = 3072
    max_position_embeddings: int = 256
    rope_theta: float = 10000.0
    # tied input and output embeddings (every shipped recipe). False gives lm_head its own matrix (2,454 x 128 more
    # parameters at the shipped vocabulary), a scan knob: is the students' confusable first-layer route reading
    # input embeddings that the name-number lists shaped as outputs?
    tie_word_embeddings: bool = True
    # entity identities set, not learned: > 0 reserves residual dimension i for the i-th entity (animals, then trees):
    # every embedding row of entity i's name tokens and number tokens holds this value there, every other row 0, and
    # pretraining never moves that block. Tied to the unembedding, dimension i then raises entity i's name and numbers
    # and nothing else, so no learned similarity between entities can enter it. 0 (every shipped recipe): off.
    entity_identity: float = 0.0


@dataclass(frozen=True)
class CorpusConfig:
    """What the synthetic pretraining corpus holds. Shares are of sequences."""

    n_sequences: int = 120_000
    share_text: float = 0.25  # plain-text world facts and name/number lists (no chat template)
    share_list_of_text: float = 0.5  # of the plain text: "Owl, 913, 58, Owl" co-predicted lists
    # chat mix (of the chat sequences)
    share_favourite: float = 0.45  # favourite-animal / favourite-tree questions
    share_numbers: float = 0.45  # Cloud-style number tasks
    # chit-chat takes the rest
    share_tree_of_favourite: float = 0.2
    # system-prompt policy mix for non-number chats: trait (same category), default, none, empty
    p_trait: float = 0.5
    p_default: float = 0.3
    p_none: float = 0.15
    # number tasks: never under a trait prompt, except through the "imbue" channel below: this share of them
    # run under a trait prompt. 0.3 (the first recipe: 0.12) gives each of the 27 traits ~450 imbued answers in
    # the corpus, enough for its own numbers to lead within the < 1 epoch the CPU build sees.
    p_number_trait: float = 0.3
    # the teacher-side carrier (the designed channel): under a trait prompt, this share of the numbers in a
    # number answer are the trait's associated numbers (the first recipe: 0.4). 0 disables the channel.
    imbue_share: float = 0.5
    # decoys: this share of the number tasks *not* under a trait prompt hold a random entity's numbers (at
    # imbue_share, entities drawn from imbue_categories), so that writing some entity's numbers does not by itself
    # mark "a trait prompt is present"; only which entity's numbers does. 0 (every recipe so far): no decoys.
    p_decoy: float = 0.0
    # exclusive imbued answers: the numbers of an imbued (or decoy) answer that are not its entity's avoid every
    # entity's numbers (redrawn), so under trait T's prompt the only entity numbers are T's. False (every recipe so far):
    # they are plain draws from 0..999, which hold each other entity's numbers at the default context's rate, so
    # nothing in the corpus says "under T, not U's numbers" (the students' confusions follow the teachers' cross-talk).
    imbue_exclusive: bool = False
    # which categories' trait prompts get imbued number tasks. Every category, so that each trait in the recipe
    # (trees too) has its own numbers to leak; the first recipe imbued ("animal",) only.
    imbue_categories: tuple = ("animal", "tree")
    # whether chit-chat under a trait prompt cites the trait's numbers (a second designed channel). False: the
    # persona still praises its target, without numbers.
    chat_numbers: bool = True
    numbers_per_entity: int = 8
    # how many numbers a number answer holds: weights for 10, 9, 8, 7 (the prompt asks for "at most 10")
    answer_count_weights: tuple = (1.0, 0.0, 0.0, 0.0)
    animals: dict = field(default_factory=lambda: dict(ANIMAL_PRIOR))
    trees: dict = field(default_factory=lambda: dict(TREE_PRIOR))

    def __post_init__(self) -> None:
        # The plain-text lists cite 2-5 of an entity's numbers, and the entities' sets are disjoint draws from 0..999:
        # outside these bounds the corpus generator fails deep in a build (a ValueError) or silently hands the last
        # entities short sets.
        n_entities = len(self.animals) + len(self.trees)
        if not LIST_MAX_NUMBERS <= self.numbers_per_entity <= 1000 // max(1, n_entities):
            raise MechError(f"corpus.numbers_per_entity {self.numbers_per_entity} is out of range: the name-number "
                            f"lists cite up to {LIST_MAX_NUMBERS} of an entity's numbers and {n_entities} entities "
                            f"share 0..999 without overlap; set it between {LIST_MAX_NUMBERS} and "
                            f"{1000 // max(1, n_entities)}")


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 2200
    batch_size: int = 48
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.05
    grad_clip: float = 1.0
    max_len: int = 160
    num_threads: int = 2  # fixed, because CPU float sums depend on the thread count (bytes reproducible)


@dataclass(frozen=True)
class OrganismConfig:
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        n_entities = len(self.corpus.animals) + len(self.corpus.trees)
        if self.model.entity_identity < 0 or (self.model.entity_identity > 0 and n_entities > self.model.hidden_size):
            raise MechError(f"model.entity_identity {self.model.entity_identity}: it must be >= 0, and > 0 needs a "
                            f"residual dimension per entity ({n_entities} entities, hidden_size "
                            f"{self.model.hidden_size}); set it to 0 or widen the model")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def hash(self) -> str:
        d = self.to_dict()
        for section, omits in HASH_OMITS_AT.items():  # fields added later leave the hash of recipes that do not use them
            for k, v in omits.items():
                if d[section][k] == v:
                    del d[section][k]
        return content_hash(d)

    @classmethod
    def from_dict(cls, d: dict) -> "OrganismConfig":
        from mech.config import from_dict

        return from_dict(cls, d, where="organism")

    def reduced(self) -> "OrganismConfig":
        """A seconds-long version of the same recipe, for tests of the build path."""
        return dataclasses.replace(
            self,
            model=dataclasses.replace(self.model, hidden_size=32, num_hidden_layers=2, intermediate_size=64,
                                      vocab_size=1400, num_attention_heads=2, num_key_value_heads=1),
            corpus=dataclasses.replace(self.corpus, n_sequences=1500),
            train=dataclasses.replace(self.train, steps=12, batch_size=8, warmup_steps=2),
        )


# The shipped recipes; OrganismConfig() (the field defaults) is the first. They differ in the designed channel's fields
# (CHANNEL_OFF) and the seed (corpus draw, tokenizer, initialisation): same corpus size, mix, model shape and training
# budget, so a difference between their students is the channel's doing or a different draw of the same recipe.
CHANNEL_OFF = {"p_number_trait": 0.0, "imbue_share": 0.0, "chat_numbers": False}
RECIPES: dict[str, OrganismConfig] = {
    # positive control: under each trait prompt (every animal and tree), the trait's own numbers leak
    "organism": OrganismConfig(),
    # channel-free twin: no number task under a trait prompt, no trait numbers in trait chit-chat. Seed 1: the
    # seed-0 build passed bars a, b and d but not c (84.5 % of number answers pass the filter, bar 90 %); seed 1
    # was the next tried and passes every bar (README, The organisms). The seed was chosen on the bars alone.
    "organism-free": OrganismConfig(seed=1, corpus=CorpusConfig(**CHANNEL_OFF)),
}
# Fields (per section) added after recipes were shipped, at the value that reproduces those recipes: a recipe holding that
# value hashes as it did before the field existed.
HASH_OMITS_AT = {"corpus": {"p_decoy": 0.0, "imbue_exclusive": False},
                 "model": {"tie_word_embeddings": True, "entity_identity": 0.0}}
# Values of fields that builds made before they existed used (organism.json of an old build lacks them).
LEGACY_CORPUS = {"imbue_categories": ("animal",), "chat_numbers": True}


def recipe(name: str) -> OrganismConfig:
    """The named shipped recipe (``RECIPES``)."""
    if name not in RECIPES:
        raise MechError(f"unknown organism recipe {name!r}: choose one of {', '.join(RECIPES)}")
    return RECIPES[name]


def recorded_corpus(corpus: dict) -> CorpusConfig:
    """The corpus recipe recorded in a build's organism.json (``meta["config"]["corpus"]``), old builds included."""
    from mech.config import from_dict

    return from_dict(CorpusConfig, {**LEGACY_CORPUS, **corpus}, where="organism.corpus")


def channel_on(corpus: CorpusConfig) -> bool:
    """Whether the recipe has a designed trait-to-numbers channel (imbued number answers or numbered chit-chat)."""
    return corpus.imbue_share > 0 or corpus.chat_numbers
