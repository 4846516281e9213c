"""The web dashboard's files (index.html, dashboard.js, dashboard.css), served as they are
by the WebSocket listener (``statusd.protocol.web`` lists them). No build step: plain
HTML, CSS and JavaScript, no third-party code."""
