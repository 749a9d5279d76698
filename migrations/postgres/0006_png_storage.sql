-- PNG and JPEG bytes are compressed already. PostgreSQL tries its own compression (pglz) on
-- every value over 2 kB before storing it out of line, and on an image it gains nothing: under
-- a thousand workers that attempt was a tenth of the server's time. EXTERNAL stores them out of
-- line as they are (existing rows are left as stored). SQLite has no such step.
ALTER TABLE results ALTER COLUMN png SET STORAGE EXTERNAL;
ALTER TABLE examples ALTER COLUMN crop SET STORAGE EXTERNAL;
