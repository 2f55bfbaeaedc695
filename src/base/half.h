#pragma once
#include "kiln/half.h"
