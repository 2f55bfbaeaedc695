#pragma once
#include "kiln/status.h"
