"""The dashboard: a static page at `/` (HTML, one vanilla JS file, CSS; no build step, nothing fetched from
elsewhere) that reads the JSON API from the browser. The page holds no data and needs no key; the API calls it
makes carry the user's key where the server requires one."""
