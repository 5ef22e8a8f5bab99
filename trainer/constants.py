"""Numbers of the Wan 2.2 S2V model that the data, training, sampling and model code share.

The values are the official Wan2.2 code's; each has this one home.
"""

#: Video frame rate the model works at: dataset windows, audio features, sampling, mp4s.
VIDEO_FPS = 16
#: Sample rate of wav2vec2's input audio, Hz; 16000 / 16 = 1000 samples per video frame.
SPEECH_SAMPLE_RATE = 16_000
#: Pixel frames carried from one chunk to the next as FramePack motion context: the VAE
#: encoding of the last 73 frames, 1 + 72 / 4 = 19 latent frames.
MOTION_FRAMES = 73
#: The blocks of the published 14B model followed by an audio injector (one injector each): the
#: transformer's default `audio_inject_layers`.
DEFAULT_AUDIO_INJECT_LAYERS: tuple[int, ...] = (0, 4, 8, 12, 16, 20, 24, 27, 30, 33, 36, 39)
