"""Speaker diarization (who spoke when): ``pipeline.Diarizer`` in the model service, speaker
attribution of transcribed segments on the API side (``attribution``)."""
