"""One class vocabulary for every dataset, so runs and evaluations match classes by name.

Each benchmark writes its labels its own way (RAF-DB numbers 1-7, AffectNet 0-10 with
"Happy", FERPlus vote columns); readers map them to these names, keep the dataset's own
label in the manifest, and propose the dataset's class order. CSV and folder labels pass
through `ALIASES` after the user's own `--alias` pairs.
"""

from __future__ import annotations

CANONICAL = ("neutral", "happiness", "sadness", "surprise", "fear", "disgust", "anger",
             "contempt")

ALIASES = {
    "happy": "happiness", "joy": "happiness",
    "sad": "sadness",
    "surprised": "surprise",
    "fearful": "fear", "scared": "fear",
    "disgusted": "disgust",
    "angry": "anger",
    "contemptuous": "contempt",
    "neural": "neutral",   # a common misspelling in FER label files
}

# RAF-DB basic, EmoLabel/list_patition_label.txt: 1..7, in this order.
RAFDB = {1: "surprise", 2: "fear", 3: "disgust", 4: "happiness", 5: "sadness", 6: "anger",
         7: "neutral"}
RAFDB_ORIGINAL = {1: "Surprise", 2: "Fear", 3: "Disgust", 4: "Happiness", 5: "Sadness",
                  6: "Anger", 7: "Neutral"}

# FERPlus fer2013new.csv vote columns after "Usage" and "Image name"; the last two are not
# expressions (an image whose majority lands there is dropped).
FERPLUS_COLUMNS = ("neutral", "happiness", "surprise", "sadness", "anger", "disgust", "fear",
                   "contempt", "unknown", "NF")
FERPLUS_CLASSES = FERPLUS_COLUMNS[:8]

# AffectNet's expression column: 0-7 expressions, 8-10 excluded (not expressions).
AFFECTNET = {0: "neutral", 1: "happiness", 2: "sadness", 3: "surprise", 4: "fear",
             5: "disgust", 6: "anger", 7: "contempt"}
AFFECTNET_ORIGINAL = {0: "Neutral", 1: "Happy", 2: "Sad", 3: "Surprise", 4: "Fear",
                      5: "Disgust", 6: "Anger", 7: "Contempt", 8: "None", 9: "Uncertain",
                      10: "Non-Face"}
