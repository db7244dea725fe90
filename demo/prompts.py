"""Task prompts in many phrasings (the point of natural-language prompts: the model learns the task,
not a tag), and the fixed answer sentences.

The official base-model prompts are used verbatim where our data fits them.
"""

from __future__ import annotations

OFFICIAL_ASR = "Detect the language and recognize the speech: <|en|>"
OFFICIAL_VOCALSOUND = "Classify the human vocal sound to VocalSound in English:"
VOCALSOUND_LABELS = {"laughter": "Laughter"}  # our classes that are VocalSound classes, with its label

NO_SPEECH = "There is no speech in this audio."
SPEECH_YES = "Yes, someone is speaking."
SPEECH_NO = "No, there is no speech."
# what the evaluation accepts as "there is no speech" in a free answer (metric "contains")
NO_SPEECH_ANSWERS = ("no speech", "no one is speaking", "nobody is speaking", "no one speaking", "not speech",
                     "no spoken", "no voice", "no words", "no talking", "nobody speaking", "no one talking",
                     "nothing is said", "no human speech", "does not contain speech", "doesn't contain speech",
                     "no one says", "nobody says")

TRANSCRIBE = (
    "Transcribe this.", "What does the speaker say?", "Write down what you hear.", "Please transcribe the audio.",
    "What is being said?", "Transcribe the speech in this recording.", "Can you write out what was said?",
    "Convert this speech to text.", "What did they say?", "Give me a transcript of this clip.",
    "Type out the spoken words.", "Write exactly what the speaker says.", "Recognize the speech and write it down.",
    "What words are spoken here?", "Please write down the sentence you hear.", "Transcribe the English speech.",
    "Listen and transcribe.", "What's being said in this audio?", "Produce a transcript.",
    "Dictation: write what you hear.", "Turn this recording into text.", "Can you tell me exactly what was said?",
    "Transcribe this English speech.", "Speech to text, please.", "Write the spoken sentence.",
    "What is the speaker saying?", "Caption this speech word for word.", "Report what was said, word for word.",
    "Please provide a verbatim transcript.", "What do you hear the person say?", "Write out the words in this clip.",
    "What was said in this recording?", "Could you transcribe what you just heard?", "Repeat what the voice says.",
    "Give me the exact words spoken.", "Listen carefully and write what is said.", "Transcript, please.",
    "What's the sentence in this audio?", "Put the spoken words into writing.", "Tell me what the speaker said.",
)
NAME_SOUND = (
    "What is this sound?", "What do you hear?", "What sound is this?", "Identify the sound.",
    "What is making this noise?", "Name the sound in this clip.", "What can you hear in this recording?",
    "What's that noise?", "Classify this sound.", "What is the source of this sound?", "Tell me what you hear.",
    "Which sound is this?", "What kind of sound is in the audio?", "Label this audio clip.",
    "Listen and tell me what this is.", "What is producing this sound?", "In a few words, what is this audio?",
    "What type of sound does this clip contain?", "What does this recording contain?", "Describe the sound briefly.",
    "Name what you hear.", "What made this sound?", "What is the sound in this clip?", "Can you identify this noise?",
    "What audio event is this?", "What am I listening to?", "Give this sound a label.", "What's this audio?",
    "Recognize the sound.", "What could be making this sound?", "What sound can be heard here?",
    "Which sound event occurs in this clip?", "What is heard in this audio?", "Identify what is making the noise.",
)
NAME_ANIMAL = ("What animal is this?", "Which animal makes this sound?", "What animal do you hear?",
               "Name the animal.", "What creature is making this noise?", "Which animal is it?",
               "What kind of animal is that?", "Identify the animal in this recording.")
NAME_INSTRUMENT = ("What instrument is playing?", "Which musical instrument is this?", "Name the instrument.",
                   "What instrument do you hear?", "Which instrument is being played?",
                   "Identify the musical instrument.", "What is this instrument?", "What's playing here?")
CATEGORY = ("What kind of sound is this: an animal, an instrument, or something else?",
            "What category does this sound belong to?", "Is this an animal, music, or another kind of sound?",
            "Which broad category fits this sound?", "What type of source made this sound?")
BACKGROUND = ("What sound is in the background?", "Besides the voice, what else can you hear?",
              "What is the background noise?", "What can you hear behind the speaker?",
              "Apart from the speech, what sound is there?", "Name the sound in the background.",
              "What other sound is playing while the person talks?", "Is there a background sound? What is it?",
              "Ignore the voice: what is the other sound?", "What is heard behind the words?")
DESCRIBE = ("Describe everything you hear.", "Describe this audio.", "What is going on in this recording?",
            "Describe the audio in one sentence.", "Give a short description of this clip.",
            "Summarize what you hear.", "What's happening in this audio?", "Tell me about this recording.")
SPEECH_PRESENT = (
    "Is anyone speaking?", "Is there speech in this audio?", "Does this clip contain a human voice talking?",
    "Can you hear someone talking?", "Is somebody saying something here?", "Does anyone speak in this recording?",
    "Is there a person talking?", "Are there any spoken words in this clip?", "Is this speech?",
    "Do you hear any speech?", "Is someone talking in this audio?", "Does the audio contain speech?",
    "Are words being spoken here?", "Is a voice speaking in this recording?", "Answer yes or no: is there speech?",
    "Can any talking be heard?", "Is there spoken language in this clip?", "Does somebody say anything?",
)
GENDER = ("Is the speaker a man or a woman?", "What is the gender of the speaker?",
          "Is this a male or a female voice?", "Who is speaking, a man or a woman?",
          "Does a man or a woman say this?", "Is the voice male or female?", "What kind of voice is this?",
          "Tell me whether the speaker is male or female.")
ANSWER_SPOKEN = ("Answer the spoken question.", "Respond to what the speaker asks.", "Answer the question you hear.",
                 "Listen to the question and answer it.", "Reply to the recording.", "What is the answer?",
                 "The speaker asks something. Answer it.", "Please answer the question in the audio.",
                 "Give an answer to the question being asked.", "Answer the question.")
ANSWER_AFTER_SOUND = ("Listen to the sound and the question that follows, then answer.",
                      "Answer the question about the sound.", "A sound, then a question: answer it.",
                      "Answer the spoken question about what you heard.", "Reply to the question at the end.",
                      "Listen and answer.")
WORD_COUNT = ("How many words did the speaker say?", "How many words was that?", "Count the words spoken.")
FOLLOW_UP_CATEGORY = ("Is it an animal, an instrument, or something else?", "What kind of thing makes that sound?",
                      "Is that an animal or a machine or music?")
FOLLOW_UP_SPEED = ("Was that said quickly or slowly?",)

GENDER_ANSWERS = {"male": "A man.", "female": "A woman."}
YES, NO = "Yes.", "No."


def sentence(text: str) -> str:
    """A label as an answer sentence: "a dog barking" -> "A dog barking."."""
    return text[0].upper() + text[1:] + ("" if text.endswith((".", "?", "!")) else ".")
