"""`peftune eval`: what an adapter learned (its target rows) and what it forgot (a general probe against the base's
own answers, multiple-choice tasks), base against tuned, with the adapter scaled from 0 to 1 in between."""
