"""Synthetic children's stories: English running text for the language-model path.

Everything here is synthetic and generated on the fly; no text is downloaded or
copied.  Why: SafeLM's language-model examples and tests need a small, offline,
reproducible corpus on which a tiny model's validation perplexity drops a lot
during training, yet which is not just a handful of repeated sentences.

How a story is built (see :func:`story_corpus`):

1. A *cast* is drawn from the word lists in :data:`WORDS`: a hero (name, kind of
   creature or child, gender for pronouns, a trait), a friend, a relative, a
   home, a place, a toy and colour, food, weather, season, and so on.  Each slot
   is drawn once per story so the story stays consistent.
2. One of twelve *plots* is picked (a lost toy, a rained-out picnic, a fear of
   the dark, learning a skill, telling the truth, ...).  Each plot has several
   templates for each beat: problem, feeling, attempt, fix and ending.
3. The paragraph is an opening, 0-2 setting sentences, then the plot beats
   (some optional), giving 3-8 sentences with dialogue in double quotes.

With the defaults (1500 stories, seed 0) the text is roughly 550 KB.  The same
``seed`` always gives the same stories.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np

WORDS: dict[str, tuple[str, ...]] = {
    "girl_name": tuple("""Lily Mia Rosie Daisy Ella Ruby Lucy Anna Nora Maisie Tilly Hannah Zara
        Ivy Molly Clara Hazel Amara Priya Sofia Leila Freya Iris Penny Willow Luna Bella Greta
        Fern Mei Nina Pippa Sadie Tess Wren Yara Elsie June Kiki Asha""".split()),
    "boy_name": tuple("""Tom Sam Ben Max Leo Jack Finn Oliver Charlie Henry Arlo Felix Hugo Toby
        Jasper Milo Ollie Ravi Omar Kofi Ali Noah Eli Rory Otis Alfie Ezra Luca Teddy Rufus Pip
        Bruno Dan Hamish Ivan Jonah Kit Luis Marco Ned""".split()),
    "kind": ("girl", "boy", "rabbit", "fox", "bear", "mouse", "squirrel", "duck", "owl", "kitten",
             "puppy", "hedgehog", "frog", "badger", "lamb", "pig", "goat", "otter", "penguin",
             "turtle", "pony", "elephant", "lion cub", "panda", "monkey", "tiger cub"),
    "trait": ("kind", "curious", "brave", "shy", "cheerful", "clever", "gentle", "silly", "busy",
              "sleepy", "friendly", "happy", "quiet", "playful", "careful", "helpful", "bold",
              "lively", "honest", "polite", "patient", "funny", "tidy", "young", "caring",
              "thoughtful", "merry", "eager", "chatty", "dreamy"),
    "home": ("small house", "cottage", "cozy burrow", "treehouse", "warm nest", "snug den",
             "farmhouse", "little hut", "houseboat", "yellow house", "cabin", "windmill",
             "lighthouse", "blue caravan"),
    "place": ("park", "beach", "meadow", "farm", "library", "market", "pond", "hill", "school",
              "garden", "zoo", "river", "playground", "village square", "orchard", "lake",
              "harbor", "fair", "museum", "bakery", "bridge", "station"),
    "landmark": ("river", "sea", "mountains", "old mill", "big lake", "green hills", "waterfall",
                 "old bridge", "tall clock tower", "castle"),
    "wild_place": ("forest", "woods", "tall grass", "cornfield", "hills", "marsh", "jungle",
                   "pine trees"),
    "town_adj": ("quiet", "busy", "sunny", "sleepy", "snowy", "windy", "tiny", "pretty",
                 "colorful", "peaceful"),
    "toy": ("ball", "kite", "teddy bear", "toy boat", "doll", "wooden train", "yo-yo",
            "spinning top", "toy car", "puzzle", "drum", "rag doll", "toy robot", "marble",
            "whistle", "jump rope", "paper plane", "storybook", "rocking horse", "toy dinosaur"),
    "color": ("red", "blue", "green", "yellow", "orange", "purple", "pink", "silver", "golden",
              "striped", "spotty", "shiny"),
    "food": ("porridge", "pancakes", "toast and jam", "warm soup", "eggs", "fresh bread",
             "honey cakes", "apple pie", "rice", "fruit salad", "muffins", "noodles"),
    "snack": ("cookies", "apples", "berries", "sandwiches", "cupcakes", "strawberries", "plums",
              "carrots", "grapes", "buns", "cherries", "peaches", "nuts", "biscuits", "crackers",
              "raisins"),
    "hobby": ("painting pictures", "singing songs", "reading books", "building sandcastles",
              "collecting shells", "climbing trees", "dancing", "counting stars", "drawing maps",
              "picking flowers", "jumping in puddles", "flying kites", "looking at clouds",
              "playing the drum", "telling jokes", "watching birds", "making mud pies",
              "playing hide and seek"),
    "parent": ("mom", "dad", "grandma", "grandpa", "aunt", "uncle", "big sister", "big brother"),
    "weather": ("sunny", "windy", "rainy", "cloudy", "snowy", "foggy", "bright", "chilly", "warm",
                "cold", "stormy", "misty"),
    "time": ("morning", "afternoon", "evening", "day"),
    "day": ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"),
    "season": ("spring", "summer", "autumn", "winter"),
    "feature": ("a fluffy tail", "big round eyes", "long floppy ears", "a loud laugh",
                "a bright red hat", "a spotty scarf", "curly hair", "muddy boots", "a tiny nose",
                "striped socks", "a big smile", "freckles on the nose", "a squeaky voice",
                "shiny buttons"),
    "creature": ("bird", "baby bird", "duckling", "butterfly", "beetle", "snail", "kitten",
                 "puppy", "hedgehog", "frog", "ladybug", "squirrel", "mole", "sparrow"),
    "feel_bad": ("sad", "worried", "upset", "scared", "cross", "lonely", "grumpy", "nervous",
                 "unhappy", "gloomy", "afraid", "miserable"),
    "feel_good": ("happy", "proud", "glad", "joyful", "cheerful", "delighted", "excited",
                  "thankful", "calm", "warm inside", "peaceful", "content"),
    "sound": ("a loud bang", "a strange squeak", "a low rumble", "a soft tapping", "a spooky hoot",
              "a creaky noise", "a scratching sound", "a long howl"),
    "skill": ("ride a bike", "swim", "whistle", "skip with a rope", "climb the big tree",
              "tie shoelaces", "read a whole book", "juggle three balls", "fly a kite",
              "skate on the ice", "catch a ball", "play the flute", "do a cartwheel"),
    "cake": ("chocolate cake", "lemon cake", "carrot cake", "apple tart", "banana bread",
             "strawberry tart", "berry pie", "honey cake", "cherry pie", "plum cake"),
    "plant": ("sunflowers", "roses", "tulips", "daisies", "poppies", "pumpkins", "beans",
              "tomatoes", "peas", "strawberries", "carrots", "marigolds"),
    "game": ("tag", "hide and seek", "hopscotch", "catch", "marbles", "pirates",
             "follow the leader", "leapfrog"),
    "helper": ("owl", "deer", "squirrel", "park ranger", "farmer", "kind old woman", "fox",
               "woodcutter", "badger", "shepherd"),
    "fragile": ("vase", "teapot", "lamp", "plate", "mug", "clock", "jar", "mirror", "bowl",
                "flower pot", "cookie jar"),
    "clothing": ("hat", "scarf", "boots", "coat", "jumper", "cap", "raincoat", "mittens"),
}

OPENINGS = '''Once upon a time, there was {a_trait} {kind} named {name}.
Once upon a time, in a {town_adj} town by the {landmark}, there lived {a_trait} {kind} named {name}.
There was once {a_trait} {kind} called {name}.
{name} was {a_trait} {kind} who lived in {a_home} near the {landmark}.
In {a_home} at the edge of the {wild_place}, there lived {a_kind} named {name}.
{name} the {kind} lived in {a_home} with {his} {parent}.
Long ago, {a_trait} {kind} named {name} lived in a {town_adj} village.
Not far from the {landmark}, there lived {a_trait} {kind} named {name}.
Once there was {a_kind} named {name} who loved {hobby}.
Every {time}, {name} the {kind} liked {hobby} by the {landmark}.
In a {town_adj} town, there was {a_kind} called {name} with {feature}.
This is a story about {a_trait} {kind} named {name}.
{name} was {a_kind} with {feature} and a very big heart.
One {weather} {season} day, {a_trait} {kind} named {name} went out to play.
Everyone in the {town_adj} village knew {name}, {a_trait} {kind} with {feature}.'''

SETTINGS = '''{He} loved {hobby} more than anything.
{His} best friend was {friend}, {a_fkind} with {feature}.
{He} liked to play with {his} {ctoy} every day.
Every morning, {his} {parent} made {food} for breakfast.
{name} and {friend} the {fkind} did everything together.
It was {a_weather} {season} {time}, and the birds were singing.
{His} favorite thing in the whole world was {his} {ctoy}.
On {day}s, {name} always went to the {place} with {friend}.
{name} was known to everyone as a very {trait} {kind}.
The {season} sun was warm, and the {place} was full of {color} flowers.
{name} often visited {friend}, who lived just down the lane.
{His} {parent} always said, "Be kind, and the world will be kind to you."
{name} wore {his} {color} {clothing} everywhere {he} went.
Most days, {name} and {friend} ate {snack} under the big tree.
{He} dreamed of one day seeing the {landmark} far away.'''

ENDINGS = '''And they all lived happily ever after.
That night, {name} went to bed with a happy heart.
It had been a long day, but a very good one.
{name} smiled, because {he} felt {feel_good}.
The end.
And that is how {name} learned something new that {season}.
{name} and {friend} laughed all the way home.
From that day on, {name} was a little wiser.
Everyone agreed it had been a wonderful {time}.
Before sleeping, {name} told {his} {parent} all about the day.
The stars came out, and {name} dreamed of the next adventure.
{name} felt {feel_good}, and the {season} sky seemed brighter than ever.'''

# Plot beats: P=problem, F=feeling, T=attempt, X=fix, E=ending.
PLOTS: dict[str, str] = {
    "lost_toy": '''P: One {time}, {name} could not find {his} {ctoy} anywhere.
P: When {name} woke up, {his} {ctoy} was gone from its usual spot.
P: After playing at the {place}, {name} saw that {his} {ctoy} was missing.
F: "Where did my {toy} go?" {name} cried.
F: {He} felt {feel_bad}, and {his} eyes filled with tears.
F: "I have looked everywhere," {he} said to {friend}.
T: {name} looked under the bed, behind the door and inside every box.
T: {He} and {friend} went back to the {place} to search.
T: {friend} said, "Let us look for it together."
X: At last, {friend} found the {toy} hiding under a pile of leaves.
X: Then {name} saw something {color} peeking out from behind a bush.
X: It turned out that {his} {parent} had put the {toy} in the toy box to keep it safe.
E: {name} hugged {his} {ctoy} and promised to keep it safe.
E: From that day on, {name} always put {his} toys away.
E: "Thank you, {friend}!" said {name} with a big smile.''',
    "stuck": '''P: Suddenly, a strong wind blew {his} kite into the top of a tall tree.
P: {name} heard a tiny cry and saw {a_creature} stuck high up in an old tree.
P: A gust of wind carried {his} {color} {clothing} up onto the roof of the shed.
F: "Oh no, I cannot reach it!" said {name}.
F: {He} jumped and jumped, but it was much too high.
F: {name} felt {feel_bad} because {he} was too small to climb so high.
T: {He} tried to shake the tree, but nothing happened.
T: {friend} brought a long stick, but it was still too short.
T: {name} ran to ask {his} {parent} for help.
X: Then {his} {parent} brought a ladder and climbed up very carefully.
X: A tall giraffe walked by and gently lifted it down with its long neck.
X: {friend} had a clever idea, and {name} climbed onto {fhis} shoulders to reach it.
E: Everyone cheered, and {name} said thank you again and again.
E: {name} learned that asking for help is a smart thing to do.''',
    "picnic": '''P: {name} had planned a picnic at the {place}, but dark clouds filled the sky.
P: Just as {name} and {friend} sat down to eat, big drops of rain began to fall.
P: On the day of the picnic, it rained and rained and rained.
F: "Now our picnic is ruined," said {name} with a sigh.
F: {name} pressed {his} nose to the window and felt {feel_bad}.
F: {friend} looked at the grey sky and did not say a word.
T: {name} waited and waited, but the rain did not stop.
T: {His} {parent} said, "Why not have the picnic inside?"
T: {name} and {friend} packed the {snack} back into the basket and ran home.
X: So they spread a blanket on the floor and ate {snack} right there.
X: They built a tent out of chairs and pillows and had the picnic under it.
X: After a while, the sun came out and a rainbow shone over the {place}.
E: It was the best picnic {name} had ever had.
E: "Rainy days can be fun too," {name} said happily.''',
    "afraid": '''P: That night, {name} heard {sound} outside the window.
P: When the lights went out, {name} was afraid of the dark.
P: A big storm came, and the thunder rumbled over the roof.
F: {He} pulled the blanket over {his} head and shivered.
F: "Is it a monster?" {name} whispered.
F: {name} felt so {feel_bad} that {he} could not sleep.
T: {He} called for {his} {parent}, who came with a lamp.
T: {name} counted to ten and took a deep breath.
T: Slowly, {name} tiptoed to the window to look.
X: It was only a branch tapping on the glass in the wind.
X: It was just an old owl saying hello to the moon.
X: {His} {parent} sat by the bed and sang a soft song until {he} felt sleepy.
E: {name} smiled and fell fast asleep.
E: After that night, {name} was not so afraid of the dark anymore.''',
    "sharing": '''P: {name} and {friend} both wanted to play with the same {toy}.
P: {friend} asked to borrow {name}'s {ctoy}, but {name} said no.
P: At the {place}, {name} and {friend} had a big argument about whose turn it was.
F: "It is mine!" shouted {name}.
F: {friend} walked away feeling {feel_bad}.
F: Soon both of them were {feel_bad}, and nobody was having any fun.
T: {name} sat alone and thought about what had happened.
T: {His} {parent} said, "Playing is more fun when you share."
T: {name} remembered how kind {friend} had always been.
X: {name} went to {friend} and said, "I am sorry. Let us take turns."
X: So they took turns, and then they found a game they could play together.
X: {name} shared {his} {snack} with {friend}, and {fhe} smiled again.
E: From then on, {name} and {friend} always shared their toys.
E: Sharing made the day much happier for both friends.''',
    "lost_way": '''P: While chasing a butterfly, {name} wandered deep into the {wild_place}.
P: {name} followed a winding path and soon did not know where {he} was.
P: When the sun began to set, {name} realized {he} was lost in the {wild_place}.
F: "How will I get home?" {name} wondered.
F: The trees looked tall and dark, and {name} felt very {feel_bad}.
F: {He} sat down on a rock and tried not to cry.
T: {name} remembered that {his} {parent} said to stay in one place when lost.
T: {He} called out, "Hello! Can anyone hear me?"
T: {He} looked for something {he} knew, like the {landmark}.
X: A friendly {helper} showed {him} the way back to the path.
X: Soon {he} heard {his} {parent} calling {his} name and ran toward the voice.
X: {name} followed the stream, and it led {him} right back to the {place}.
E: {name} was very glad to be home, safe and warm.
E: Next time, {name} promised to stay close to home.''',
    "skill": '''P: {name} wanted to learn to {skill}, but it was very hard.
P: All of {his} friends could {skill}, but {name} could not.
P: Every time {name} tried to {skill}, {he} made a mistake.
F: "I will never be able to do it," {name} said sadly.
F: {He} felt {feel_bad} and wanted to give up.
F: Some of the other children laughed, and {name}'s cheeks turned red.
T: {friend} said, "Don't give up. Try a little every day."
T: So {name} practiced every morning and every evening.
T: {His} {parent} showed {him} how to go slowly, one step at a time.
X: After many days, {name} could finally {skill}!
X: One {weather} {time}, {name} tried again, and this time it worked.
X: Little by little, {name} got better and better.
E: {name} felt so proud of {self}.
E: {name} learned that practice and patience help you grow.''',
    "baking": '''P: {name} wanted to bake a {cake} for {his} {parent}'s birthday.
P: {name} decided to make a surprise {cake} for {friend}.
P: {name} mixed flour, eggs and sugar for a {cake}, but forgot to watch the oven.
F: When {he} opened the oven, the {cake} was burnt and black.
F: "Oh no, it is ruined!" cried {name}.
F: The kitchen was a mess, and {name} felt {feel_bad}.
T: {name} cleaned up the kitchen and started all over again.
T: {friend} came to help, and together they read the recipe very carefully.
T: This time, {name} set a timer so {he} would not forget.
X: The new {cake} came out golden, warm and smelling sweet.
X: They decorated it with {snack} and a little flag that said hooray.
X: Even though it was a bit lopsided, everyone said it tasted wonderful.
E: "This is the best {cake} in the world," said {his} {parent}.
E: {name} learned that mistakes can be fixed if you keep trying.''',
    "garden": '''P: In the {season}, {name} planted some {plant} seeds in the garden.
P: {name} watered {his} little seeds every day, but nothing came up.
P: {name} wished {he} could grow {plant} like {his} {parent}.
F: "Why aren't they growing?" {name} asked.
F: {He} stared at the bare brown soil and felt {feel_bad}.
F: {He} wanted to dig up the seeds to check on them.
T: {His} {parent} said, "Seeds need time, sun and water. Be patient."
T: So {name} waited, and watered, and waited some more.
T: {name} pulled out the weeds and made a little fence around the seeds.
X: One morning, {name} saw tiny green shoots poking out of the ground.
X: Weeks later, the garden was full of {plant}.
X: Soon the {plant} grew tall and strong in the warm sun.
E: {name} shared the {plant} with all the neighbors.
E: {name} learned that good things take time.''',
    "help_animal": '''P: On the way to the {place}, {name} found {a_creature} with a hurt leg.
P: {name} heard a soft cry and found {a_creature} tangled in some string.
P: Near the {place}, {a_creature} was sitting all alone and shivering.
F: "Poor little thing," said {name} softly.
F: {name} felt {feel_bad} for the little {creature}.
F: The {creature} looked up at {name} with frightened eyes.
T: {name} gently picked it up and carried it home in {his} {clothing}.
T: {He} made a soft bed for it out of an old scarf.
T: {His} {parent} helped {him} give it water and a few crumbs.
X: After a few days, the {creature} was strong and well again.
X: Soon the {creature} could move about just like before.
X: When it was better, {name} took it back to the {place} and set it free.
E: The {creature} came back to visit {name} every {day}.
E: {name} was glad {he} had stopped to help.''',
    "new_friend": '''P: {name} was new at school and did not know anyone.
P: On the first day at the new school, {name} stood by the wall all alone.
P: {name} was too shy to join the other children at the {place}.
F: {He} felt {feel_bad} and wished {he} could go home.
F: "Nobody wants to play with me," {name} said quietly.
F: {He} watched the others play and held {his} {ctoy} tightly.
T: Then {friend}, {a_fkind} with {feature}, came over and said hello.
T: {His} {parent} said, "Just smile and say hello. You can do it."
T: {name} took a deep breath and walked up to {friend}.
X: "Do you want to play {game} with me?" asked {friend}.
X: Soon {name} and {friend} were laughing and playing {game} together.
X: {friend} showed {name} around and shared {fhis} {snack}.
E: After that, {name} was never lonely at school again.
E: {name} and {friend} became the best of friends.''',
    "honesty": '''P: While playing ball inside, {name} knocked over {his} {parent}'s favorite {fragile}.
P: Crash! {name}'s ball hit the {fragile}, and it broke into pieces.
P: {name} was running in the kitchen, bumped the table, and the {fragile} fell.
F: {name} was afraid {he} would get in trouble.
F: {He} thought about hiding the pieces under the rug.
F: "Maybe nobody will notice," {name} whispered.
T: But {name} felt {feel_bad} inside and could not stop thinking about it.
T: {name} knew that telling the truth was the right thing to do.
T: {He} took a deep breath and went to find {his} {parent}.
X: "I broke the {fragile}. I am sorry," said {name}.
X: {His} {parent} gave {him} a hug and said, "Thank you for telling me the truth."
X: Together they glued the pieces back, and it looked almost as good as new.
E: {name} felt much lighter after telling the truth.
E: {name} learned that honesty is always the best way.''',
}

_BEATS = ("P", "F", "T", "X", "E")


def _lines(block: str) -> tuple[str, ...]:
    return tuple(line.strip() for line in block.strip().splitlines() if line.strip())


def _plot_beats(block: str) -> dict[str, tuple[str, ...]]:
    beats: dict[str, list[str]] = {b: [] for b in _BEATS}
    for line in _lines(block):
        beat, text = line.split(":", 1)
        beats[beat].append(text.strip())
    return {b: tuple(v) for b, v in beats.items()}


_OPENINGS, _SETTINGS, _ENDINGS = _lines(OPENINGS), _lines(SETTINGS), _lines(ENDINGS)
_PLOTS = {name: _plot_beats(block) for name, block in PLOTS.items()}
_PLOT_NAMES = tuple(sorted(_PLOTS))


def all_templates() -> list[str]:
    """Every sentence template, so tests can check variety and that all slots exist."""
    out = list(_OPENINGS + _SETTINGS + _ENDINGS)
    for beats in _PLOTS.values():
        for b in _BEATS:
            out.extend(beats[b])
    return out


def _pick(rng: np.random.Generator, seq):
    return seq[int(rng.integers(len(seq)))]


def _article(phrase: str) -> str:
    vowel = phrase[0].lower() in "aeiou" or phrase.startswith("honest")
    return ("an " if vowel else "a ") + phrase


def _context(rng: np.random.Generator) -> dict[str, str]:
    """Draw the cast and props of one story; every template slot is filled from here."""
    ctx = {slot: _pick(rng, WORDS[slot]) for slot in WORDS if not slot.endswith("_name")}
    female, friend_female = bool(rng.integers(2)), bool(rng.integers(2))
    ctx["name"] = _pick(rng, WORDS["girl_name" if female else "boy_name"])
    friend = ctx["name"]
    while friend == ctx["name"]:
        friend = _pick(rng, WORDS["girl_name" if friend_female else "boy_name"])
    ctx["friend"] = friend
    ctx["fkind"] = _pick(rng, WORDS["kind"])
    ctx.update(zip(("he", "him", "his", "self"),
                   ("she", "her", "her", "herself") if female else ("he", "him", "his", "himself")))
    ctx.update(zip(("fhe", "fhim", "fhis"),
                   ("she", "her", "her") if friend_female else ("he", "him", "his")))
    ctx["He"], ctx["His"] = ctx["he"].capitalize(), ctx["his"].capitalize()
    ctx["ctoy"] = f"{ctx['color']} {ctx['toy']}"
    for slot in ("trait", "kind", "fkind", "home", "creature", "weather"):
        ctx["a_" + slot] = _article(ctx[slot])
    return ctx


def _fill(template: str, ctx: dict[str, str]) -> str:
    text = template.format_map(ctx)
    i = 1 if text.startswith('"') else 0
    return text[:i] + text[i].upper() + text[i + 1:]


def _story(rng: np.random.Generator) -> str:
    ctx = _context(rng)
    beats = _PLOTS[_pick(rng, _PLOT_NAMES)]
    n_settings = int(rng.choice(3, p=(0.35, 0.45, 0.2)))
    settings = [_SETTINGS[i] for i in rng.choice(len(_SETTINGS), n_settings, replace=False)]
    parts = [_pick(rng, _OPENINGS), *settings, _pick(rng, beats["P"])]
    if rng.random() < 0.75:
        parts.append(_pick(rng, beats["F"]))
    if rng.random() < 0.65:
        parts.append(_pick(rng, beats["T"]))
    fixes = rng.choice(len(beats["X"]), 2 if rng.random() < 0.25 else 1, replace=False)
    parts.extend(beats["X"][i] for i in sorted(fixes))
    if rng.random() < 0.8:
        parts.append(_pick(rng, beats["E"] if rng.random() < 0.5 else _ENDINGS))
    return " ".join(_fill(t, ctx) for t in parts[:8])


def story_corpus(n_stories: int = 1500, *, seed: int = 0) -> list[str]:
    """Generate ``n_stories`` synthetic children's stories (one paragraph each).

    Deterministic for a given ``seed``: story ``i`` depends only on ``seed`` and
    the stories before it, so a longer corpus extends a shorter one.
    """
    if n_stories < 0:
        raise ValueError(f"n_stories must be >= 0, got {n_stories}")
    rng = np.random.default_rng(seed)
    return [_story(rng) for _ in range(n_stories)]


def _atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` to ``path`` via a temp file + ``os.replace``, so readers never
    see a half-written file and a crash leaves any old file intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_story_text(path: str | os.PathLike[str], n_stories: int = 1500,
                     seed: int = 0) -> None:
    """Write :func:`story_corpus` as a plain running-text file, stories separated
    by blank lines (the format the language-model data loader expects)."""
    stories = story_corpus(n_stories, seed=seed)
    _atomic_write_text(path, "\n\n".join(stories) + "\n")
