"""A small hand-written CRM lead fixture with ground truth, for the plausibility tests.

Written for these tests (not tuned on): mixed formats (``Key: value`` lines, head counts in
prose, no size at all), one lead per industry family plus a few hard ones, so the emulator's
answers to a schema it has never seen can be measured, not just eyeballed.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

Industry = Literal[
    "software", "healthcare", "financial_services", "retail", "manufacturing", "education", "other"
]
Size = Literal["1-10", "11-50", "51-200", "201-1000", "1000+", "unknown"]


class LeadProfile(BaseModel):
    """A user's own enrichment schema: nothing in it matches the emulator's built-in ticket labels."""

    industry: Industry = Field(description="Industry the company operates in.")
    company_size: Size = Field(description="Employee head-count band.")
    persona: str = Field(max_length=80, description="Job title / buyer persona of the contact.")
    confidence: float = Field(ge=0, le=1, description="How sure you are about industry and size.")
    evidence: str = Field(
        max_length=300, description="Verbatim quote from the record that supports the industry."
    )


TEMPLATE = "Enrich this inbound lead.\n\nCompany: {company}\nContact: {contact}\nNotes: {notes}"

# (company, contact, notes, industry, size band, title expected in persona or None)
LEADS: list[tuple[str, str, str, str, str, str | None]] = [
    ("Northwind Clinics", "Dana Reyes, Chief Medical Officer",
     "Runs 14 clinics with about 350 employees. Wants patient intake forms digitised before the audit.",
     "healthcare", "201-1000", "Chief Medical Officer"),
    ("Brightpath Academy", "Sam Olsen, IT Director",
     "Private school group, 3 campuses and 120 staff. Students and teachers need single sign-on.",
     "education", "51-200", "IT Director"),
    ("Ledgerline", "Priya Nair, CFO",
     "Fintech startup offering small-business lending. Team of 8 people, seed round closed in May.",
     "financial_services", "1-10", "CFO"),
    ("Copperleaf Manufacturing", "Tom Becker, Plant Manager",
     "Two factories producing machined parts for automotive OEMs; 2,400 employees across both plants.",
     "manufacturing", "1000+", "Plant Manager"),
    ("Urban Threads", "Lena Kowalski, Head of Ecommerce",
     "Fashion retailer with 40 stores and an online shop. Around 600 employees.",
     "retail", "201-1000", "Head of Ecommerce"),
    ("Stackhive", "Marco Silva, VP Engineering",
     "B2B SaaS platform for developer tools, 45 employees, evaluating vendors for CI analytics.",
     "software", "11-50", "VP Engineering"),
    ("Harbor Mutual", "Grace Liu, Director of Operations",
     "Regional insurance company handling home and auto claims. Headcount: 1,800.",
     "financial_services", "1000+", "Director of Operations"),
    ("Greenfield Dental", "Ahmed Karim, Owner",
     "Family dental practice, 6 staff, patients book by phone today.",
     "healthcare", "1-10", "Owner"),
    ("Quantum Ledger Bank", "Sofia Rossi, Head of IT",
     "Retail bank with 90 branches and mortgage lending. Employees: 5000.",
     "financial_services", "1000+", "Head of IT"),
    ("Pixelforge", "Jonas Berg, CTO",
     "Software studio building mobile apps for clients; a 25-person team.",
     "software", "11-50", "CTO"),
    ("Riverside University", "Helen Park, Director of Student Services",
     "University with 12,000 students; the registrar's office wants to automate course enrolment questions.",
     "education", "unknown", "Director of Student Services"),
    ("MetalWorks Fabrication", "Bill Turner, Operations Manager",
     "CNC machining and metal fabrication shop, 75 employees, running two shifts on the shop floor.",
     "manufacturing", "51-200", "Operations Manager"),
    ("Corner Market Co", "Mia Chen, Founder",
     "Runs three grocery stores in Leeds, 30 staff. Wants a loyalty app for shoppers.",
     "retail", "11-50", "Founder"),
    ("CarePoint Home Health", "Oliver Grant, Nurse Manager",
     "Home healthcare provider; nurses visit 900 patients a week.",
     "healthcare", "unknown", "Nurse Manager"),
    ("DataNimbus", "Eva Schultz, Data Engineer",
     "Cloud data platform, Series B, roughly 180 employees; evaluating our API for ingestion.",
     "software", "51-200", "Data Engineer"),
    ("Lakeside Credit Union", "Paul Martin, Marketing Coordinator",
     "Credit union serving teachers; 140 staff and 6 branches.",
     "financial_services", "51-200", "Marketing Coordinator"),
    ("Summit Learning Labs", "Nora Quinn, Curriculum Director",
     "Edtech company building tutoring software for schools, 60 employees.",
     "education", "51-200", "Curriculum Director"),
    ("Atlas Components", "Raj Patel, Procurement Manager",
     "Industrial manufacturer of hydraulic components; 450 employees in one plant.",
     "manufacturing", "201-1000", "Procurement Manager"),
    ("Bloom & Co", "Chloe Martin, Owner",
     "Boutique flower shop with an online store, 4 people.",
     "retail", "1-10", "Owner"),
    ("Meridian Events", "Jack Doyle, Managing Director",
     "Events agency organising conferences; would like to hear about pricing.",
     "other", "unknown", "Managing Director"),
    ("Helix Biotech", "Dr. Ana Lopez, Head of Research",
     "Biotech company running clinical trials with 300 employees across two labs.",
     "healthcare", "201-1000", "Head of Research"),
    ("Cobalt Security", "Ryan Hughes, Security Engineer",
     "Cybersecurity software vendor, 1,200 employees worldwide.",
     "software", "1000+", "Security Engineer"),
    ("Oakridge Schools District", "Linda Brooks, Superintendent",
     "School district with 40 schools; staff of 2,000 teachers and administrators.",
     "education", "1000+", None),
    ("Northstar Logistics", "Kim Ito, Fleet Coordinator",
     "Freight company; contact asked for a demo next week.",
     "other", "unknown", "Fleet Coordinator"),
]  # fmt: skip
