"""The vocabulary of SynthPEDES: colours, garments, attribute groups, and the generation constants."""

# Bump when drawing or captions change: an existing directory is then regenerated.
VERSION = 3  # 2: splits sampled test first; image seeds keyed by position within the split;
             # 3: base identities take colour pairs in rounds
PARAMS_FILE = 'synthpedes.json'
JSON_FILE = 'reid_raw.json'
SPLITS = ('train', 'val', 'test')
SAMPLING_ORDER = ('test', 'val', 'train')  # see make_identities
DEFAULT_IMAGE_SIZE = (192, 64)  # (H, W)
MIN_IMAGE_SIZE = (48, 20)
SUPERSAMPLE = 2  # drawing supersampling factor (anti-aliasing)

# The 12 garment colours (RGB) and the words captions use for them.
COLOURS = {
    'black': (30, 30, 32),
    'white': (238, 238, 234),
    'grey': (132, 132, 132),
    'red': (208, 30, 36),
    'orange': (247, 136, 22),
    'yellow': (246, 214, 38),
    'green': (36, 150, 58),
    'blue': (46, 108, 228),
    'dark blue': (24, 34, 104),
    'purple': (126, 48, 166),
    'pink': (246, 140, 192),
    'brown': (118, 70, 34),
}
COLOUR_WORDS = {'grey': ('grey', 'grey', 'gray'), 'dark blue': ('dark blue', 'dark blue', 'navy blue', 'navy')}
HAIR_COLOURS = {'black': (26, 22, 20), 'brown': (104, 62, 30), 'blonde': (222, 188, 108),
                'grey': (176, 176, 172)}
HAIR_WORDS = {'black': ('black', 'black', 'dark'), 'blonde': ('blonde', 'blond'), 'brown': ('brown',),
              'grey': ('grey', 'gray')}
SKIN_TONES = ((248, 214, 186), (234, 190, 150), (204, 150, 106), (160, 108, 72), (112, 72, 46))
DARK_COLOURS = frozenset({'black', 'grey', 'red', 'green', 'blue', 'dark blue', 'purple', 'brown'})
JEANS_COLOURS = ('blue', 'dark blue', 'black', 'grey', 'white')
UPPER_TYPES = ('t-shirt', 'shirt', 'jacket', 'coat', 'hoodie', 'dress')
LOWER_TYPES = ('trousers', 'jeans', 'shorts', 'skirt')
PATTERNS = {'t-shirt': ('plain', 'striped', 'logo'), 'shirt': ('plain', 'striped', 'checked'),
            'jacket': ('plain', 'checked'), 'coat': ('plain', 'checked'),
            'hoodie': ('plain', 'striped', 'logo'), 'dress': ('plain', 'striped', 'checked')}
SLEEVES = {'t-shirt': ('short',), 'shirt': ('short', 'long'), 'jacket': ('long',), 'coat': ('long',),
           'hoodie': ('long',), 'dress': ('sleeveless', 'short')}

# Described attribute groups: identities differ in these; a hard negative changes one or two of them.
GROUPS = {
    'gender': ('gender',),
    'hair_style': ('hair_style',),
    'hair_colour': ('hair_colour',),
    'upper_type': ('upper_type', 'sleeve'),
    'upper_colour': ('upper_colour',),
    'pattern': ('pattern',),
    'lower_type': ('lower_type',),
    'lower_colour': ('lower_colour',),
    'shoes_colour': ('shoes_colour',),
    'bag': ('bag', 'bag_colour'),
    'hat': ('hat', 'hat_colour'),
    'glasses': ('glasses',),
    'accessory': ('accessory', 'accessory_colour'),
}
# How often each group is the one a hard negative changes (gender never).
HARD_NEGATIVE_WEIGHTS = {'hair_style': 1.0, 'hair_colour': 1.0, 'upper_type': 1.0, 'upper_colour': 3.0,
                 'pattern': 1.0, 'lower_type': 1.0, 'lower_colour': 3.0, 'shoes_colour': 1.5, 'bag': 2.0,
                 'hat': 1.0, 'glasses': 0.5, 'accessory': 1.0}
