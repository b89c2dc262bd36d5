"""Documents and questions for the knowledge tests: three documents of tenant `acme` (Markdown,
HTML, PDF), one of tenant `globex` (plain text), and questions whose answers are in them.

The two tenants deliberately share a document id (`policies`) and a question (annual leave),
with different answers, so a leak across tenants cannot go unnoticed.
"""

from __future__ import annotations

from dataclasses import dataclass

from tests.pdfgen import make_pdf

ACME, GLOBEX = "acme", "globex"

HANDBOOK_MD = """---
title: Acme Employee Handbook
---
# Acme Employee Handbook

Welcome to Acme. This handbook explains the rules that apply to every employee, from the first
day onwards. When a rule here and your contract disagree, the contract wins.

## Annual leave

Every full-time employee gets 27 days of annual leave per calendar year, on top of public
holidays. Part-time employees get a pro-rata share. Leave is requested in the Rota app at least
two weeks in advance for absences longer than three days.

Unused leave days can be carried over into the next year, but only up to five days, and the
carried-over days must be taken before March 31. Days that are not taken by then expire.

## Parental leave

Parents get 16 weeks of fully paid parental leave, which can be split into at most three blocks
within the first two years after the birth or adoption of a child.

## Working from home

Employees may work from home up to three days per week. Core hours are from 10:00 to 15:00,
during which everyone must be reachable on chat. Working from another country needs written
approval from the People team, for at most 30 days per year.

## Expenses

Expense claims must be submitted within 30 days of the purchase through the Ledgerly portal.
Receipts are required for every item above 25 euros. Claims are reimbursed with the next salary
payment once the manager has approved them.

## Equipment

Every employee receives a laptop, which is replaced every four years, and a monitor for the home
office. Broken equipment is reported to the IT service desk, which lends a replacement device
the same day.
"""

IT_SECURITY_HTML = """<!doctype html>
<html><head><title>Acme IT Security Rules</title>
<style>body { font-family: sans-serif; }</style></head>
<body>
<nav>Intranet · IT · Security</nav>
<h1>IT Security Rules</h1>
<p>These rules protect Acme's systems and the data of our customers. They apply to every device
that connects to the company network.</p>
<h2>Passwords and sign-in</h2>
<p>Passwords must be at least <b>14 characters</b> long and must not be reused across services.
Every employee signs in with a hardware security key as the second factor; keys are handed out
by the service desk on the first day.</p>
<h2>Remote access</h2>
<p>Remote access to internal systems goes through the WireGuard VPN, using the
<em>Gatekeeper</em> client. The VPN disconnects after twelve hours and must then be reconnected.</p>
<h2>Reporting incidents</h2>
<p>Suspected security incidents, such as phishing mails or a lost laptop, must be reported
within one hour by calling extension 4400 or by writing to security@acme.example.
Do not try to investigate an incident yourself.</p>
<h2>Guest network</h2>
<p>Visitors use the guest Wi-Fi called acme-guest. Its password changes every Monday and is shown
on the screens at the reception desk.</p>
<h2>Backups</h2>
<p>File servers are backed up every night at 02:00. Backups are kept for 35 days and a monthly
copy is stored offline in a second data centre.</p>
<script>console.log("analytics")</script>
</body></html>
"""

ROUTER_FAQ_PAGES = [
    [
        "Nimbus Router X2 - Frequently Asked Questions",
        "",
        "What is the default address of the admin page?",
        "The admin page of the Nimbus Router X2 is reached at 192.168.8.1 from any",
        "connected device. The initial password is printed on the label under the router.",
        "",
        "How do I reset the router to factory settings?",
        "Hold the recessed pin button on the back for 12 seconds until the light blinks",
        "white. All settings, including the Wi-Fi name and password, are erased.",
    ],
    [
        "How long is the warranty?",
        "The Nimbus Router X2 comes with a warranty of three years from the date of purchase.",
        "A warranty claim needs the serial number and the invoice.",
        "",
        "How many devices can connect at the same time?",
        "Up to 64 clients can be connected at once, spread over both frequency bands.",
        "",
        "What does a red light mean?",
        "A steady red light means the router has no internet connection. A blinking red",
        "light means a firmware update is being installed; do not unplug the router then.",
    ],
]

GLOBEX_TXT = """Globex Staff Policies

Travel. Flights longer than six hours may be booked in business class; shorter flights are
economy. All trips are booked through TripDesk at least 14 days before departure.

Hotels. The hotel budget is 180 dollars per night in most cities and 250 dollars per night in
London, New York and Tokyo. The daily allowance for meals is 60 dollars.

Annual leave. Globex employees get 20 days of annual leave per year. Leave cannot be carried
over into the next year.

Canteen. The staff canteen on the ground floor serves lunch from 11:30 and closes at 14:30.
"""


@dataclass(frozen=True)
class Doc:
    tenant: str
    doc_id: str
    content_type: str
    text: str | None = None
    data: bytes | None = None


def documents() -> list[Doc]:
    return [
        Doc(ACME, "policies", "text/markdown", text=HANDBOOK_MD),
        Doc(ACME, "it/security.html", "text/html", text=IT_SECURITY_HTML),
        Doc(ACME, "router-faq.pdf", "application/pdf", data=make_pdf(ROUTER_FAQ_PAGES, title="Nimbus FAQ")),
        Doc(GLOBEX, "policies", "text/plain", text=GLOBEX_TXT),
    ]


@dataclass(frozen=True)
class Question:
    tenant: str
    text: str
    doc_id: str
    answer: str  # appears in the chunk that answers the question


QUESTIONS = [
    Question(ACME, "How many days of annual leave do employees get?", "policies", "27 days"),
    Question(ACME, "Until when must carried-over leave days be taken?", "policies", "March 31"),
    Question(ACME, "How many days per week can I work from home?", "policies", "three days per week"),
    Question(ACME, "How long is paid parental leave?", "policies", "16 weeks"),
    Question(ACME, "Within how many days must I submit an expense claim?", "policies", "within 30 days"),
    Question(ACME, "How often are laptops replaced?", "policies", "every four years"),
    Question(ACME, "How long must a password be?", "it/security.html", "14 characters"),
    Question(ACME, "How do I report a lost laptop or a phishing mail?", "it/security.html", "4400"),
    Question(ACME, "Which VPN client do I use for remote access?", "it/security.html", "Gatekeeper"),
    Question(ACME, "How long are backups kept?", "it/security.html", "35 days"),
    Question(ACME, "What is the password of the guest Wi-Fi?", "it/security.html", "every Monday"),
    Question(ACME, "What is the IP address of the router admin page?", "router-faq.pdf", "192.168.8.1"),
    Question(ACME, "How do I factory reset the Nimbus router?", "router-faq.pdf", "12 seconds"),
    Question(ACME, "How long is the router's warranty?", "router-faq.pdf", "three years"),
    Question(ACME, "How many devices can the router handle at once?", "router-faq.pdf", "64 clients"),
    Question(GLOBEX, "How many days of annual leave do employees get?", "policies", "20 days"),
    Question(GLOBEX, "What is the hotel budget per night?", "policies", "180 dollars"),
    Question(GLOBEX, "When may I fly business class?", "policies", "six hours"),
    Question(GLOBEX, "When does the canteen close?", "policies", "14:30"),
]
