-- A filter whose image ended mostly silent under a post-ReLU objective is ascended again from the
-- same seed on the mean before the ReLU, when the run's settings ask for it (`second_ascent`,
-- on in the `atlas` preset); the image with the higher activation is kept. For such a filter
-- these hold both ascents' activations (`first_activation` of the first ascent,
-- `second_activation` of the pre-ReLU one; `activation` is the higher of the two). NULL for
-- every other filter, and for results stored before this column existed or by a worker that
-- does not send them.
ALTER TABLE results ADD COLUMN first_activation REAL;
ALTER TABLE results ADD COLUMN second_activation REAL;
