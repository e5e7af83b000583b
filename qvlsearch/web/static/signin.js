// Sign in: the key goes once to POST /web/signin, which answers with an HttpOnly, SameSite=Strict cookie.
"use strict";

document.addEventListener("DOMContentLoaded", () => {
  const form = document.querySelector("#signin");
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const answer = await fetch("/web/signin", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ key: form.elements.key.value }),
    });
    if (answer.ok) location.assign("/");
    else document.querySelector("#status").textContent = "That is not this server's key.";
  });
});
